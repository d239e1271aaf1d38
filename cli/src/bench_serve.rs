//! `graft bench serve`: online serving benchmark against a running OpenAI-compatible
//! server, measured like vLLM's `bench serve`: requests arrive all at once or as a
//! Poisson process, optionally capped in flight, each streams `/v1/completions`; per
//! request TTFT, TPOT, every inter-token gap (ITL) and end-to-end latency.
//!
//! Requests spread over K adapters (the server's `/v1/models` entries that have a
//! `parent`) with S-LoRA's popularity patterns: uniform, skewed (Zipf) or distinct.
//! Everything random (prompts, arrivals, adapter choice) follows `--seed`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
pub enum Popularity {
    /// Each request picks one of the K adapters uniformly at random.
    Uniform,
    /// Power law (Zipf): adapter k (1-based) has weight 1 / k^exponent.
    Skewed,
    /// Request i uses adapter i mod K (every adapter in turn).
    Distinct,
}

#[derive(Args, Debug)]
pub struct ServeBenchArgs {
    /// Server base URL (http only), e.g. http://127.0.0.1:8080.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Requests per second, Poisson arrivals; inf sends every request at t = 0.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Requests in flight at most (default: no limit).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Prompt length in tokens, about: random common words, their count calibrated
    /// by one request's reported prompt tokens.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Tokens asked of every request (`max_tokens`, with `ignore_eos`).
    #[arg(long, default_value_t = 64)]
    pub output_len: usize,
    /// Adapters the requests spread over (0: the base model only).
    #[arg(long, default_value_t = 0)]
    pub adapters: usize,
    /// Adapter names to use instead of the first K from /v1/models (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub adapter_names: Vec<String>,
    #[arg(long, value_enum, default_value_t = Popularity::Uniform)]
    pub popularity: Popularity,
    /// Exponent of the skewed (Zipf) popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,
    /// `model` of base-model requests (default: the first /v1/models entry without
    /// a parent).
    #[arg(long)]
    pub model: Option<String>,
    /// Write the result JSON (pretty, with per-request arrays) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write an SVG of the TTFT, ITL and E2E latency distributions (CDFs).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Seconds a request may take before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
}

/// splitmix64: reproducible and plenty for workload generation.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_f64() * n as f64) as usize % n.max(1)
    }
}

/// Common English words that BPE tokenizers keep whole (with their leading space),
/// so a prompt of L words is about L tokens.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "name",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
];

fn prompt(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len * 6);
    for i in 0..len {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.below(WORDS.len())]);
    }
    s
}

/// Adapter index (into the K names) of every request, or None for the base.
fn assign_adapters(args: &ServeBenchArgs, k: usize, rng: &mut Rng) -> Vec<Option<usize>> {
    if k == 0 {
        return vec![None; args.num_prompts];
    }
    // Cumulative Zipf weights for the skewed pattern.
    let cdf: Vec<f64> = (1..=k)
        .scan(0.0, |acc, r| {
            *acc += (r as f64).powf(-args.zipf_exponent);
            Some(*acc)
        })
        .collect();
    let total = cdf.last().copied().unwrap_or(1.0);
    (0..args.num_prompts)
        .map(|i| {
            Some(match args.popularity {
                Popularity::Distinct => i % k,
                Popularity::Uniform => rng.below(k),
                Popularity::Skewed => {
                    let u = rng.next_f64() * total;
                    cdf.iter().position(|&c| u < c).unwrap_or(k - 1)
                }
            })
        })
        .collect()
}

/// Send times from the start (seconds): all zero at rate inf, else exponential gaps.
fn arrivals(rate: f64, n: usize, rng: &mut Rng) -> Vec<f64> {
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            if rate.is_finite() {
                // 1 - u is in (0, 1]: ln never sees 0.
                t += -(1.0 - rng.next_f64()).ln() / rate;
            }
            t
        })
        .collect()
}

/// `http://host:port/prefix` split into the address to dial, the Host header and
/// the path prefix.
#[derive(Debug, Clone)]
struct Target {
    addr: String,
    host: String,
    prefix: String,
}

fn parse_url(url: &str) -> Result<Target> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("--url {url}: only http:// URLs are supported"))?;
    let (host, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if host.is_empty() {
        bail!("--url {url}: no host");
    }
    let addr = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok(Target {
        addr,
        host: host.to_owned(),
        prefix: prefix.to_owned(),
    })
}

type Body = hyper::body::Incoming;

/// One HTTP/1.1 exchange on a fresh connection; returns the status and the body to
/// read incrementally.
async fn send(
    t: &Target,
    key: Option<&str>,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
) -> Result<(u16, Body)> {
    let stream = tokio::net::TcpStream::connect(&t.addr)
        .await
        .with_context(|| format!("cannot connect to {}", t.addr))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", t.prefix))
        .header(header::HOST, &t.host);
    if let Some(k) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(b)))?,
        None => req.body(Full::new(Bytes::new()))?,
    };
    let resp = sender.send_request(req).await?;
    Ok((resp.status().as_u16(), resp.into_body()))
}

async fn read_all(mut body: Body) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame?.data_ref() {
            out.extend_from_slice(d);
        }
    }
    Ok(out)
}

/// The server's base model id and its adapters (entries with a `parent`), in order.
async fn list_models(t: &Target, key: Option<&str>) -> Result<(Option<String>, Vec<String>)> {
    let (status, body) = send(t, key, hyper::Method::GET, "/v1/models", None).await?;
    let bytes = read_all(body).await?;
    if status != 200 {
        bail!(
            "GET /v1/models: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let v: Value = serde_json::from_slice(&bytes).context("GET /v1/models: not JSON")?;
    let data = v["data"].as_array().cloned().unwrap_or_default();
    let mut base = None;
    let mut adapters = Vec::new();
    for m in &data {
        let Some(id) = m["id"].as_str() else { continue };
        if m["parent"].as_str().is_some_and(|p| !p.is_empty()) {
            adapters.push(id.to_owned());
        } else if base.is_none() {
            base = Some(id.to_owned());
        }
    }
    Ok((base, adapters))
}

/// Words per prompt so that prompts are about `len` tokens: one non-streaming request
/// of `len` words reports its `usage.prompt_tokens` (any OpenAI server does), and the
/// count is scaled by it. Without usage, one word per token is assumed.
async fn calibrate_words(
    t: &Target,
    key: Option<&str>,
    len: usize,
    model: Option<&str>,
    seed: u64,
) -> Result<usize> {
    let mut body = json!({
        "prompt": prompt(&mut Rng(seed), len),
        "max_tokens": 1,
        "temperature": 0,
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let (status, resp) = send(
        t,
        key,
        hyper::Method::POST,
        "/v1/completions",
        Some(body.to_string()),
    )
    .await?;
    let bytes = read_all(resp).await?;
    if status != 200 {
        bail!(
            "the calibration request failed: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(match v["usage"]["prompt_tokens"].as_u64() {
        Some(p) if p > 0 => ((len * len) as f64 / p as f64).round().max(1.0) as usize,
        _ => len,
    })
}

/// What one request measured.
#[derive(Debug, Default, Clone)]
struct Outcome {
    success: bool,
    error: String,
    /// Seconds from send to the first chunk with choices.
    ttft: f64,
    /// Gaps between chunks after the first.
    itl: Vec<f64>,
    e2e: f64,
    prompt_tokens: Option<usize>,
    output_tokens: usize,
    adapter: Option<usize>,
}

/// Incremental SSE parser: `data:` payloads of complete events, tolerant of `\r\n`
/// line ends (sse-starlette) and comment lines.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.buf.extend_from_slice(bytes);
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                self.data.push(d.strip_prefix(' ').unwrap_or(d).to_owned());
            }
        }
    }
}

async fn one_request(t: Arc<Target>, key: Option<Arc<str>>, body: String) -> Outcome {
    let start = Instant::now();
    let mut o = Outcome::default();
    let result: Result<()> = async {
        let (status, mut resp) = send(
            &t,
            key.as_deref(),
            hyper::Method::POST,
            "/v1/completions",
            Some(body),
        )
        .await?;
        if status != 200 {
            let bytes = read_all(resp).await.unwrap_or_default();
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&bytes));
        }
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        let mut last: Option<Instant> = None;
        let mut chunks = 0usize;
        let mut text_chunks = 0usize;
        let mut usage_tokens = None;
        let mut done = false;
        while let Some(frame) = resp.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            let now = Instant::now();
            parser.push(data, &mut events);
            for ev in events.drain(..) {
                if ev.trim() == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(&ev)
                    .with_context(|| format!("stream chunk is not JSON: {ev}"))?;
                if let Some(e) = v.get("error") {
                    bail!("error in stream: {e}");
                }
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    usage_tokens = u["completion_tokens"].as_u64().map(|n| n as usize);
                    o.prompt_tokens = u["prompt_tokens"].as_u64().map(|n| n as usize);
                }
                if let Some(c) = v["choices"].get(0) {
                    let text = c["text"].as_str().or(c["delta"]["content"].as_str());
                    text_chunks += usize::from(text.is_some_and(|t| !t.is_empty()));
                    match last {
                        None => o.ttft = (now - start).as_secs_f64(),
                        Some(prev) => o.itl.push((now - prev).as_secs_f64()),
                    }
                    last = Some(now);
                    chunks += 1;
                }
            }
        }
        if chunks == 0 {
            bail!("the stream ended without a completion chunk");
        }
        if !done {
            bail!("the stream ended without [DONE]");
        }
        // Servers that report usage say exactly; else one chunk with text per token
        // (llama.cpp's servers; their last chunk only carries the finish reason).
        o.output_tokens = usage_tokens.unwrap_or(text_chunks);
        Ok(())
    }
    .await;
    o.e2e = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => o.success = true,
        Err(e) => o.error = format!("{e:#}"),
    }
    o
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn std_dev(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// Percentile `p` (0..=100) with linear interpolation between ranks (numpy's default).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// mean/median/std/p99 of `values` (seconds) as `{stat}_{name}_ms` fields.
fn stats(out: &mut serde_json::Map<String, Value>, name: &str, values: &[f64]) {
    let mut s: Vec<f64> = values.iter().map(|v| v * 1e3).collect();
    s.sort_by(f64::total_cmp);
    out.insert(format!("mean_{name}_ms"), json!(mean(&s)));
    out.insert(format!("median_{name}_ms"), json!(percentile(&s, 50.0)));
    out.insert(format!("std_{name}_ms"), json!(std_dev(&s)));
    out.insert(format!("p99_{name}_ms"), json!(percentile(&s, 99.0)));
}

pub fn run(args: &ServeBenchArgs) -> Result<()> {
    if args.num_prompts == 0 || args.input_len == 0 || args.output_len == 0 {
        bail!("--num-prompts, --input-len and --output-len must be at least 1");
    }
    if args.request_rate.is_nan() || args.request_rate <= 0.0 {
        bail!("--request-rate must be positive (inf: all at once)");
    }
    if args.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1");
    }
    if args.popularity == Popularity::Skewed && !args.zipf_exponent.is_finite() {
        bail!("--zipf-exponent must be finite");
    }
    let target = Arc::new(parse_url(&args.url)?);
    // One thread drives every connection: the client must not take CPU from a server
    // on the same machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(bench(args, target))
}

async fn bench(args: &ServeBenchArgs, target: Arc<Target>) -> Result<()> {
    let key: Option<Arc<str>> = args.api_key.as_deref().map(Arc::from);
    let (base_id, listed) = list_models(&target, key.as_deref()).await?;
    let names: Vec<String> = if args.adapter_names.is_empty() {
        listed.iter().take(args.adapters).cloned().collect()
    } else {
        args.adapter_names
            .iter()
            .take(args.adapters.max(args.adapter_names.len()))
            .cloned()
            .collect()
    };
    let k = if args.adapter_names.is_empty() {
        args.adapters
    } else {
        names.len()
    };
    if names.len() < k {
        bail!(
            "--adapters {k}: the server lists only {} adapters ({})",
            names.len(),
            names.join(", ")
        );
    }
    let base_model = args.model.clone().or(base_id);

    let words = calibrate_words(
        &target,
        key.as_deref(),
        args.input_len,
        base_model.as_deref(),
        args.seed ^ 0xca1,
    )
    .await?;
    let mut rng = Rng(args.seed);
    let assigned = assign_adapters(args, k, &mut Rng(args.seed ^ 0xada9));
    let times = arrivals(
        args.request_rate,
        args.num_prompts,
        &mut Rng(args.seed ^ 0x7153),
    );
    let body_of = |prompt: String, adapter: Option<usize>| {
        let mut b = json!({
            "prompt": prompt,
            "max_tokens": args.output_len,
            "temperature": 0,
            // Exactly output_len tokens from servers that support it (vLLM, graft).
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match (adapter, &base_model) {
            (Some(a), _) => b["model"] = json!(names[a]),
            (None, Some(m)) => b["model"] = json!(m),
            (None, None) => {}
        }
        b.to_string()
    };
    let bodies: Vec<String> = assigned
        .iter()
        .map(|&a| body_of(prompt(&mut rng, words), a))
        .collect();

    // One request first, as vLLM does: fail fast on a wrong URL, model or key.
    let probe = one_request(
        target.clone(),
        key.clone(),
        body_of(prompt(&mut Rng(args.seed ^ 0x9e), words), None),
    )
    .await;
    if !probe.success {
        bail!("the initial test request failed: {}", probe.error);
    }

    let bar = indicatif::ProgressBar::new(args.num_prompts as u64);
    let limit = args
        .max_concurrency
        .map(|c| Arc::new(tokio::sync::Semaphore::new(c)));
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(args.num_prompts);
    for (i, body) in bodies.into_iter().enumerate() {
        tokio::time::sleep_until((start + Duration::from_secs_f64(times[i])).into()).await;
        let (t, key, limit, bar) = (target.clone(), key.clone(), limit.clone(), bar.clone());
        let adapter = assigned[i];
        tasks.push(tokio::spawn(async move {
            let _permit = match &limit {
                Some(s) => Some(s.clone().acquire_owned().await),
                None => None,
            };
            let mut o = match tokio::time::timeout(timeout, one_request(t, key, body)).await {
                Ok(o) => o,
                Err(_) => Outcome {
                    error: format!("timed out after {:.0} s", timeout.as_secs_f64()),
                    ..Outcome::default()
                },
            };
            o.adapter = adapter;
            bar.inc(1);
            o
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.map_err(|e| anyhow!("request task failed: {e}"))?);
    }
    let duration = start.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.success).collect();
    let completed = ok.len();
    let failed = outcomes.len() - completed;
    let input_lens: Vec<usize> = ok
        .iter()
        .map(|o| o.prompt_tokens.unwrap_or(args.input_len))
        .collect();
    let output_lens: Vec<usize> = ok.iter().map(|o| o.output_tokens).collect();
    let total_input: usize = input_lens.iter().sum();
    let total_output: usize = output_lens.iter().sum();
    let ttfts: Vec<f64> = ok.iter().map(|o| o.ttft).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|o| o.itl.iter().copied()).collect();
    let e2els: Vec<f64> = ok.iter().map(|o| o.e2e).collect();
    let tpots: Vec<f64> = ok
        .iter()
        .filter(|o| o.output_tokens > 1)
        .map(|o| (o.e2e - o.ttft) / (o.output_tokens - 1) as f64)
        .collect();
    let mut errors: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.success)
        .map(|o| o.error.clone())
        .collect();
    errors.sort();
    errors.dedup();
    errors.truncate(10);

    let mut out = serde_json::Map::new();
    let rate = if args.request_rate.is_finite() {
        json!(args.request_rate)
    } else {
        json!("inf")
    };
    for (k_, v) in [
        ("url", json!(args.url)),
        ("endpoint", json!("/v1/completions")),
        ("model", json!(base_model)),
        ("num_prompts", json!(args.num_prompts)),
        ("request_rate", rate),
        ("max_concurrency", json!(args.max_concurrency)),
        ("input_len", json!(args.input_len)),
        ("prompt_words", json!(words)),
        ("output_len", json!(args.output_len)),
        ("adapters", json!(k)),
        ("adapter_names", json!(names)),
        (
            "popularity",
            json!(format!("{:?}", args.popularity).to_lowercase()),
        ),
        ("seed", json!(args.seed)),
        ("duration", json!(duration)),
        ("completed", json!(completed)),
        ("failed", json!(failed)),
        ("total_input_tokens", json!(total_input)),
        ("total_output_tokens", json!(total_output)),
        ("request_throughput", json!(completed as f64 / duration)),
        ("output_throughput", json!(total_output as f64 / duration)),
        (
            "total_token_throughput",
            json!((total_input + total_output) as f64 / duration),
        ),
    ] {
        out.insert(k_.to_owned(), v);
    }
    stats(&mut out, "ttft", &ttfts);
    stats(&mut out, "tpot", &tpots);
    stats(&mut out, "itl", &itls);
    stats(&mut out, "e2el", &e2els);
    out.insert("errors".into(), json!(errors));
    let summary = Value::Object(out.clone());

    if let Some(path) = &args.out {
        // The file also keeps every request's numbers, like vLLM's --save-result.
        out.insert("input_lens".into(), json!(input_lens));
        out.insert("output_lens".into(), json!(output_lens));
        out.insert("ttfts".into(), json!(ttfts));
        out.insert("e2els".into(), json!(e2els));
        out.insert(
            "itls".into(),
            json!(ok.iter().map(|o| o.itl.clone()).collect::<Vec<_>>()),
        );
        out.insert(
            "adapter_of_request".into(),
            json!(ok
                .iter()
                .map(|o| o.adapter.map(|a| names[a].clone()))
                .collect::<Vec<_>>()),
        );
        let text = serde_json::to_string_pretty(&Value::Object(out))?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let svg = plot_cdfs(&[("TTFT", &ttfts), ("ITL", &itls), ("E2E latency", &e2els)]);
        std::fs::write(path, svg).with_context(|| format!("cannot write {}", path.display()))?;
    }
    crate::write_stdout(&format!("{summary}\n"))
}

/// One panel per series: the empirical CDF of its values in milliseconds.
fn plot_cdfs(series: &[(&str, &[f64])]) -> String {
    use std::fmt::Write;
    let (pw, ph) = (360.0, 240.0);
    let (ml, mr, mt, mb) = (56.0, 16.0, 28.0, 40.0);
    let width = series.len() as f64 * pw;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{ph}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{width}" height="{ph}" fill="white"/>"#);
    for (p, (name, values)) in series.iter().enumerate() {
        let x0 = p as f64 * pw + ml;
        let (w, h) = (pw - ml - mr, ph - mt - mb);
        let y0 = mt + h;
        let mut v: Vec<f64> = values.iter().map(|x| x * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let max = v.last().copied().unwrap_or(1.0).max(1e-3);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="13">{name} CDF (n = {})</text>"#,
            x0 + w / 2.0,
            v.len()
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{mt}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##
        );
        for i in 0..=4 {
            let f = i as f64 / 4.0;
            let (gx, gy) = (x0 + f * w, y0 - f * h);
            let _ = writeln!(
                s,
                r##"<line x1="{gx}" y1="{mt}" x2="{gx}" y2="{y0}" stroke="#eee"/><line x1="{x0}" y1="{gy}" x2="{}" y2="{gy}" stroke="#eee"/>"##,
                x0 + w
            );
            let _ = writeln!(
                s,
                r#"<text x="{gx}" y="{}" text-anchor="middle">{:.1}</text><text x="{}" y="{}" text-anchor="end">{:.2}</text>"#,
                y0 + 14.0,
                f * max,
                x0 - 4.0,
                gy + 4.0,
                f
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">ms</text>"#,
            x0 + w / 2.0,
            y0 + 30.0
        );
        if !v.is_empty() {
            let n = v.len() as f64;
            let mut path = format!("M{x0:.1},{y0:.1}");
            for (i, x) in v.iter().enumerate() {
                let px = x0 + x / max * w;
                let _ = write!(
                    path,
                    " L{px:.1},{:.1} L{px:.1},{:.1}",
                    y0 - i as f64 / n * h,
                    y0 - (i + 1) as f64 / n * h
                );
            }
            let _ = writeln!(
                s,
                r##"<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>"##
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn sse_parser_handles_crlf_split_chunks_and_comments() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.push(b"data: {\"a\":1}\r\n\r\n: ping\r\n\r\nda", &mut out);
        p.push(b"ta: [DONE]\n", &mut out);
        assert_eq!(out, ["{\"a\":1}"]);
        p.push(b"\n", &mut out);
        assert_eq!(out, ["{\"a\":1}", "[DONE]"]);
    }

    fn args(pop: Popularity, n: usize) -> ServeBenchArgs {
        ServeBenchArgs {
            url: "http://127.0.0.1:1".into(),
            request_rate: f64::INFINITY,
            max_concurrency: None,
            num_prompts: n,
            input_len: 8,
            output_len: 8,
            adapters: 0,
            adapter_names: Vec::new(),
            popularity: pop,
            zipf_exponent: 1.0,
            seed: 0,
            api_key: None,
            model: None,
            out: None,
            plot: None,
            timeout: 1.0,
        }
    }

    #[test]
    fn popularity_patterns() {
        let k = 8;
        let count = |p: Popularity| {
            let mut c = vec![0usize; k];
            for a in assign_adapters(&args(p, 4000), k, &mut Rng(3)) {
                c[a.unwrap()] += 1;
            }
            c
        };
        assert_eq!(count(Popularity::Distinct), vec![500; k]);
        let u = count(Popularity::Uniform);
        assert!(u.iter().all(|&c| (400..600).contains(&c)), "{u:?}");
        // Zipf(1) over 8: the first gets 1/H_8 = 37%, the last 4.6%.
        let s = count(Popularity::Skewed);
        assert!(s.windows(2).all(|w| w[0] >= w[1]), "{s:?}");
        assert!((1300..1650).contains(&s[0]) && s[7] < 300, "{s:?}");
        // Deterministic for a seed.
        let a = assign_adapters(&args(Popularity::Uniform, 50), k, &mut Rng(9));
        assert_eq!(
            a,
            assign_adapters(&args(Popularity::Uniform, 50), k, &mut Rng(9))
        );
    }

    #[test]
    fn poisson_arrivals_have_the_asked_rate() {
        let t = arrivals(10.0, 5000, &mut Rng(1));
        assert!(t.windows(2).all(|w| w[1] >= w[0]));
        let rate = 5000.0 / t[4999];
        assert!((9.5..10.5).contains(&rate), "{rate}");
        assert!(arrivals(f64::INFINITY, 4, &mut Rng(1))
            .iter()
            .all(|&x| x == 0.0));
    }

    #[test]
    fn urls() {
        let t = parse_url("http://127.0.0.1:8080/").unwrap();
        assert_eq!((t.addr.as_str(), t.prefix.as_str()), ("127.0.0.1:8080", ""));
        let t = parse_url("http://localhost/api").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.prefix.as_str()),
            ("localhost:80", "/api")
        );
        assert!(parse_url("https://x").is_err());
    }
}
