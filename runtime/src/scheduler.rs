//! Continuous batching: many generation requests share forward steps.
//!
//! Every [`Engine::step`] builds one batch from the running sequences: each feeds the
//! part of its context (prompt, then the tokens it sampled) that is not in the KV cache
//! yet, up to a token budget, so prefill and decode mix freely and requests join and
//! leave at any step. Each sequence names its own delta (adapter or stack), at most
//! `max_deltas_per_step` distinct ones per step. The KV cache is paged; when a step
//! does not fit, the most recently admitted sequence is preempted (its blocks freed,
//! its context recomputed later: vLLM's recompute preemption). Admission is strictly
//! first-come first-served and every step serves the sequences that waited longest
//! first, so none starves.
//!
//! The engine is synchronous and single-threaded (`&mut self`); a server runs it on a
//! thread of its own and feeds it through channels. Its output for a request equals
//! [`generate_adapted`](crate::generate::generate_adapted) alone (greedy, and sampled
//! with the same seed), up to the batch invariance of the forward pass.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::generate::{FinishReason, GenerateParams};
use crate::kv_cache::{KvCache, SeqId};
use crate::model::{BatchDeltas, BatchToken, LinearDelta, Model, ModelError, Scratch};
use crate::sampling::{Sampler, SamplingError, StopChecker};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Identifies a request for its whole life.
pub type RequestId = u64;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per forward step (decode tokens count one each).
    pub max_batch_tokens: usize,
    /// Sequences holding KV blocks at once.
    pub max_running: usize,
    /// Distinct deltas (adapters, stacks) per forward step (`--max-loras`).
    pub max_deltas_per_step: usize,
    /// Requests waiting for admission before `submit` refuses (backpressure).
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: 512,
            max_running: 64,
            max_deltas_per_step: 8,
            max_waiting: 256,
        }
    }
}

/// One generation request.
#[derive(Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Adapter or stack for this request, or none for the base.
    pub delta: Option<Arc<dyn LinearDelta>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("prompt ({prompt} tokens) plus max_tokens ({max_tokens}) needs {needed} KV blocks, the cache has {total}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        needed: usize,
        total: usize,
    },
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// What a step produced for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A sampled token and the text it completes (possibly empty; stop strings held back).
    Token {
        id: RequestId,
        token: u32,
        text: String,
    },
    /// The request is over; `text` is its last piece (decoder and stop-string tail).
    Done {
        id: RequestId,
        finish: FinishReason,
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

struct Sequence<'t> {
    id: RequestId,
    slot: SeqId,
    /// Prompt followed by every sampled token.
    context: Vec<u32>,
    prompt_len: usize,
    /// Tokens of `context` whose keys and values are in the cache.
    cached: usize,
    params: GenerateParams,
    delta: Option<Arc<dyn LinearDelta>>,
    sampler: Sampler,
    decoder: StreamDecoder<'t>,
    stops: StopChecker,
    /// Step number when it last ran (older first: no starvation).
    last_step: u64,
}

impl Sequence<'_> {
    fn generated(&self) -> usize {
        self.context.len() - self.prompt_len
    }

    /// Context tokens not in the cache yet: the rest of the prompt during prefill, then
    /// one (the newest sampled token) per decode step.
    fn pending(&self) -> usize {
        self.context.len() - self.cached
    }
}

/// Continuous-batching generation over one model and one paged KV cache.
pub struct Engine<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    cache: KvCache,
    scratch: Scratch,
    config: EngineConfig,
    waiting: VecDeque<Sequence<'m>>,
    running: Vec<Sequence<'m>>,
    next_id: RequestId,
    step: u64,
    preemptions: u64,
    /// (tokens, sequences) of the last forward step.
    last_batch: (usize, usize),
}

impl<'m> Engine<'m> {
    pub fn new(
        model: &'m Model,
        tokenizer: &'m Tokenizer,
        cache: KvCache,
        config: EngineConfig,
    ) -> Self {
        Engine {
            model,
            tokenizer,
            cache,
            scratch: Scratch::default(),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
            step: 0,
            preemptions: 0,
            last_batch: (0, 0),
        }
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences preempted so far (KV cache full).
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Tokens and sequences of the last forward step.
    pub fn last_batch(&self) -> (usize, usize) {
        self.last_batch
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a request; it starts at a later [`step`](Self::step).
    pub fn submit(&mut self, req: Request) -> Result<RequestId, EngineError> {
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let bs = self.cache.block_size();
        let needed = (req.prompt.len() + req.params.max_tokens).div_ceil(bs);
        if needed > self.cache.total_blocks() {
            return Err(EngineError::TooLong {
                prompt: req.prompt.len(),
                max_tokens: req.params.max_tokens,
                needed,
                total: self.cache.total_blocks(),
            });
        }
        let mut sampler = Sampler::new(req.params.sampling.clone(), self.model.config.n_vocab)?;
        if self.waiting.len() >= self.config.max_waiting {
            return Err(EngineError::QueueFull(self.waiting.len()));
        }
        for &t in &req.prompt {
            sampler.accept(t);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Sequence {
            id,
            // Slots are request ids folded into the cache's id space; ids of live
            // requests never collide (at most max_running + max_waiting live).
            slot: (id % u32::MAX as u64) as SeqId,
            prompt_len: req.prompt.len(),
            context: req.prompt,
            cached: 0,
            stops: StopChecker::new(req.params.stop.iter()),
            params: req.params,
            delta: req.delta,
            sampler,
            decoder: self.tokenizer.stream_decoder(),
            last_step: 0,
        });
        Ok(id)
    }

    /// Stops a request; its `Done` event (finish `Cancelled`) is returned. `None` if it
    /// is unknown or already finished.
    pub fn cancel(&mut self, id: RequestId) -> Option<Event> {
        let seq = if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i)
        } else {
            let i = self.running.iter().position(|s| s.id == id)?;
            Some(self.running.remove(i))
        }?;
        self.cache.remove(seq.slot);
        Some(Event::Done {
            id,
            finish: FinishReason::Cancelled,
            text: String::new(),
            prompt_tokens: seq.prompt_len,
            completion_tokens: seq.generated(),
        })
    }

    fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.cache.block_size())
    }

    /// Admits waiting requests in arrival order while there is room.
    fn admit(&mut self) {
        let mut free = self.cache.free_blocks();
        while self.running.len() < self.config.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            // Room for its whole context plus the next token; otherwise wait (FCFS:
            // no request overtakes the front one).
            let need = self.blocks_for(front.context.len() + 1);
            if need > free {
                break;
            }
            free -= need;
            if let Some(seq) = self.waiting.pop_front() {
                self.running.push(seq);
            }
        }
    }

    /// Frees the KV blocks of the most recently admitted running sequence (other than
    /// those in `keep`) and queues it again at the front; false if none can go.
    fn preempt_one(&mut self, keep: usize) -> bool {
        if self.running.len() <= keep {
            return false;
        }
        let Some(mut seq) = self.running.pop() else {
            return false;
        };
        tracing::debug!(request = seq.id, "preempted: KV cache full");
        self.cache.remove(seq.slot);
        seq.cached = 0;
        self.preemptions += 1;
        self.waiting.push_front(seq);
        true
    }

    /// Runs one forward step and returns what it produced.
    pub fn step(&mut self) -> Result<Vec<Event>, EngineError> {
        self.admit();
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        self.step += 1;

        // Serve the sequences that waited longest first, under the delta limit.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].last_step, self.running[i].id));
        let mut deltas: Vec<*const ()> = Vec::new();
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (running index, tokens to feed)
        let mut budget = self.config.max_batch_tokens.max(1);
        for &i in &order {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            if let Some(d) = &s.delta {
                let key = Arc::as_ptr(d) as *const ();
                if !deltas.contains(&key) {
                    if deltas.len() >= self.config.max_deltas_per_step.max(1) {
                        continue;
                    }
                    deltas.push(key);
                }
            }
            let n = s.pending().min(budget);
            budget -= n;
            plan.push((i, n));
        }

        // Make the step fit the cache: preempt the newest sequences not in the plan
        // first, then planned ones (dropping them from the plan).
        loop {
            let needed: usize = plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    self.blocks_for(s.cached + n)
                        .saturating_sub(self.blocks_for(self.cache.seq_len(s.slot)))
                })
                .sum();
            if needed <= self.cache.free_blocks() {
                break;
            }
            let last = self.running.len() - 1;
            if plan.len() == 1 && plan[0].0 == last && last == 0 {
                // One sequence alone cannot fit: submit() bounds prompt + max_tokens,
                // so this only happens when the cache is shared with others.
                return Err(EngineError::Model(ModelError::Forward(
                    "KV cache too small for a single sequence".into(),
                )));
            }
            plan.retain(|&(i, _)| i != last);
            self.preempt_one(0);
        }

        let mut batch = Vec::new();
        let mut per_token: Vec<Option<&dyn LinearDelta>> = Vec::new();
        let mut logits_rows: Vec<usize> = Vec::new(); // running index per logits row
        for &(i, n) in &plan {
            let s = &self.running[i];
            for k in 0..n {
                let pos = s.cached + k;
                let last = pos + 1 == s.context.len();
                batch.push(BatchToken {
                    token: s.context[pos],
                    pos,
                    seq: s.slot,
                    logits: last,
                });
                per_token.push(s.delta.as_deref());
                if last {
                    logits_rows.push(i);
                }
            }
        }
        let deltas = per_token
            .iter()
            .any(Option::is_some)
            .then(|| BatchDeltas::per_token(&per_token));
        let out = self.model.forward_adapted(
            &batch,
            &mut self.cache,
            &mut self.scratch,
            deltas.as_ref(),
        )?;
        drop(deltas);
        self.last_batch = (batch.len(), plan.len());
        for &(i, n) in &plan {
            let s = &mut self.running[i];
            s.cached += n;
            s.last_step = self.step;
        }

        let mut events = Vec::new();
        let mut finished: Vec<usize> = Vec::new();
        for (row, &i) in logits_rows.iter().enumerate() {
            let s = &mut self.running[i];
            if s.params.max_tokens == 0 {
                events.push(finish(s, FinishReason::Length));
                finished.push(i);
                continue;
            }
            let next = s.sampler.try_sample(out.row(row))?;
            s.sampler.accept(next);
            if self.tokenizer.is_eog(next) && !s.params.ignore_eos {
                events.push(finish(s, FinishReason::Stop));
                finished.push(i);
                continue;
            }
            s.context.push(next);
            let piece = s.decoder.push(next);
            let r = s.stops.push(&piece);
            events.push(Event::Token {
                id: s.id,
                token: next,
                text: r.emit,
            });
            if r.stopped {
                events.push(finish(s, FinishReason::Stop));
                finished.push(i);
            } else if s.generated() >= s.params.max_tokens {
                events.push(finish(s, FinishReason::Length));
                finished.push(i);
            }
        }
        finished.sort_unstable();
        for &i in finished.iter().rev() {
            let s = self.running.remove(i);
            self.cache.remove(s.slot);
        }
        Ok(events)
    }

    /// Steps until every request is done, collecting the events.
    pub fn run_to_completion(&mut self) -> Result<Vec<Event>, EngineError> {
        let mut all = Vec::new();
        while !self.is_idle() {
            all.extend(self.step()?);
        }
        Ok(all)
    }
}

/// The `Done` event of `s`, flushing its decoder and stop-string tail like
/// [`generate`](crate::generate::generate) does.
fn finish(s: &mut Sequence, reason: FinishReason) -> Event {
    let mut text = String::new();
    if !s.stops.is_stopped() {
        let rest = s.decoder.flush();
        text = s.stops.push(&rest).emit;
        if !s.stops.is_stopped() {
            text.push_str(&s.stops.finish());
        }
    }
    Event::Done {
        id: s.id,
        finish: reason,
        text,
        prompt_tokens: s.prompt_len,
        completion_tokens: s.generated(),
    }
}

/// Messages from [`EngineHandle`]s to the engine thread.
enum Command {
    Submit {
        req: Request,
        events: std::sync::mpsc::Sender<Event>,
        reply: std::sync::mpsc::Sender<Result<RequestId, EngineError>>,
    },
    Cancel(RequestId),
    Shutdown,
}

/// An [`Engine`] on a thread of its own, shared by any number of callers: each
/// submitted request gets a channel that receives its events, ending with `Done`.
/// Dropping a request's receiver cancels it at the next step (a client went away).
#[derive(Clone)]
pub struct EngineHandle {
    commands: std::sync::mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
}

/// Live numbers of an [`EngineThread`], published after every command and step (for a
/// server's metrics; reading them never waits for the engine).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests queued for admission.
    pub waiting: AtomicUsize,
    /// Sequences admitted (holding or about to hold KV blocks).
    pub running: AtomicUsize,
    pub kv_used_blocks: AtomicUsize,
    pub kv_total_blocks: AtomicUsize,
    /// Sequences in the last forward step.
    pub last_batch_sequences: AtomicUsize,
    pub steps: AtomicU64,
    /// Tokens fed to forward steps, and sequences served by them, summed over steps.
    pub batch_tokens: AtomicU64,
    pub batch_sequences: AtomicU64,
    pub preemptions: AtomicU64,
    /// Requests cancelled before finishing (client gone, or a failed step).
    pub cancelled: AtomicU64,
}

impl EngineStats {
    fn publish(&self, engine: &Engine) {
        let cache = engine.cache();
        let r = Ordering::Relaxed;
        self.waiting.store(engine.n_waiting(), r);
        self.running.store(engine.n_running(), r);
        self.kv_total_blocks.store(cache.total_blocks(), r);
        self.kv_used_blocks
            .store(cache.total_blocks() - cache.free_blocks(), r);
        self.preemptions.store(engine.preemptions(), r);
        if engine.n_running() == 0 {
            self.last_batch_sequences.store(0, r);
        }
    }
}

/// Joins the engine thread when the last owner drops it.
pub struct EngineThread {
    handle: EngineHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EngineThread {
    /// Starts the engine thread over `model` with `cache`.
    pub fn spawn(
        model: Arc<Model>,
        tokenizer: Arc<Tokenizer>,
        cache: KvCache,
        config: EngineConfig,
    ) -> std::io::Result<EngineThread> {
        let (tx, rx) = std::sync::mpsc::channel::<Command>();
        let stats = Arc::new(EngineStats::default());
        let loop_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("graft-engine".into())
            .spawn(move || engine_loop(&model, &tokenizer, cache, config, rx, &loop_stats))?;
        Ok(EngineThread {
            handle: EngineHandle {
                commands: tx,
                stats,
            },
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Finishes every accepted request, then stops the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.handle.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the engine has stopped")]
    Stopped,
}

impl EngineHandle {
    /// Queues `req`; its events arrive on the returned receiver.
    pub fn submit(
        &self,
        req: Request,
    ) -> Result<(RequestId, std::sync::mpsc::Receiver<Event>), HandleError> {
        let (events, rx) = std::sync::mpsc::channel();
        let (reply, reply_rx) = std::sync::mpsc::channel();
        self.commands
            .send(Command::Submit { req, events, reply })
            .map_err(|_| HandleError::Stopped)?;
        let id = reply_rx.recv().map_err(|_| HandleError::Stopped)??;
        Ok((id, rx))
    }

    /// Cancels a request (its receiver gets `Done` with finish `Cancelled`), queued or
    /// running; a no-op once it has finished.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(Command::Cancel(id));
    }

    /// The engine's live numbers.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
}

fn engine_loop(
    model: &Model,
    tokenizer: &Tokenizer,
    cache: KvCache,
    config: EngineConfig,
    rx: std::sync::mpsc::Receiver<Command>,
    stats: &EngineStats,
) {
    use std::collections::HashMap;
    use std::sync::mpsc::{RecvTimeoutError, Sender, TryRecvError};

    let mut engine = Engine::new(model, tokenizer, cache, config);
    let mut senders: HashMap<RequestId, Sender<Event>> = HashMap::new();
    let mut shutting_down = false;
    let handle = |engine: &mut Engine,
                  senders: &mut HashMap<RequestId, Sender<Event>>,
                  cmd: Command,
                  shutting_down: &mut bool| match cmd {
        Command::Submit { req, events, reply } => {
            let r = if *shutting_down {
                Err(EngineError::QueueFull(engine.n_waiting()))
            } else {
                engine.submit(req)
            };
            if let Ok(id) = r {
                senders.insert(id, events);
            }
            let _ = reply.send(r);
        }
        Command::Cancel(id) => {
            if let (Some(ev), Some(tx)) = (engine.cancel(id), senders.remove(&id)) {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(ev);
            }
        }
        Command::Shutdown => *shutting_down = true,
    };
    loop {
        stats.publish(&engine);
        // Idle: block for work; busy: take what arrived and keep stepping.
        if engine.is_idle() {
            if shutting_down {
                return;
            }
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(cmd) => handle(&mut engine, &mut senders, cmd, &mut shutting_down),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => handle(&mut engine, &mut senders, cmd, &mut shutting_down),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    shutting_down = true;
                    break;
                }
            }
        }
        let steps_before = engine.step;
        let events = match engine.step() {
            Ok(ev) => {
                if engine.step != steps_before {
                    let (tokens, seqs) = engine.last_batch();
                    stats.steps.fetch_add(1, Ordering::Relaxed);
                    stats
                        .batch_tokens
                        .fetch_add(tokens as u64, Ordering::Relaxed);
                    stats
                        .batch_sequences
                        .fetch_add(seqs as u64, Ordering::Relaxed);
                    stats.last_batch_sequences.store(seqs, Ordering::Relaxed);
                }
                ev
            }
            Err(e) => {
                // A failed step cannot be attributed to one request: end them all.
                tracing::error!("engine step failed: {e}");
                let ids: Vec<RequestId> = senders.keys().copied().collect();
                for id in ids {
                    if let (Some(ev), Some(tx)) = (engine.cancel(id), senders.remove(&id)) {
                        stats.cancelled.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(ev);
                    }
                }
                continue;
            }
        };
        for ev in events {
            let (id, done) = match &ev {
                Event::Token { id, .. } => (*id, false),
                Event::Done { id, .. } => (*id, true),
            };
            let gone = senders.get(&id).is_none_or(|tx| tx.send(ev).is_err());
            if done {
                senders.remove(&id);
            } else if gone {
                // The receiver was dropped: the client is gone.
                if engine.cancel(id).is_some() {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                senders.remove(&id);
            }
        }
    }
}
