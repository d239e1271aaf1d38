//! Prometheus counters, gauges and latency histograms, rendered as text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graft_runtime::scheduler::EngineStats;

/// Bucket bounds in seconds. Time to first token spans queueing and prefill.
const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Gaps between tokens: one decode step each, longer when prefills share the step.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Whole requests.
const E2E_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// A Prometheus histogram of durations (lock-free: one atomic per bucket).
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is +Inf.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, s: &mut String, name: &str, help: &str) {
        let _ = writeln!(s, "# HELP {name} {help}");
        let _ = writeln!(s, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 * 1e-9;
        let _ = writeln!(s, "{name}_sum {sum}");
        let _ = writeln!(s, "{name}_count {cumulative}");
    }
}

pub struct Metrics {
    /// Responses by HTTP status.
    by_status: Mutex<BTreeMap<u16, u64>>,
    /// Generation requests accepted by the engine, by adapter label (`base` for none).
    by_adapter: Mutex<BTreeMap<String, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Generation requests between arrival and their last byte (or their client leaving).
    pub in_flight: AtomicUsize,
    /// Requests whose client went away before they finished.
    pub aborted: AtomicU64,
    /// Arrival to the first generated token.
    pub ttft: Histogram,
    /// Every gap between two generated tokens of a request.
    pub itl: Histogram,
    /// Arrival to the last token, for requests that finished.
    pub e2e: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            by_status: Mutex::default(),
            by_adapter: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            aborted: AtomicU64::new(0),
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay meaningful after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn metric(s: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(s, "# HELP {name} {help}");
    let _ = writeln!(s, "# TYPE {name} {kind}");
    let _ = writeln!(s, "{name} {value}");
}

impl Metrics {
    pub fn response(&self, status: u16) {
        *lock(&self.by_status).entry(status).or_default() += 1;
    }

    pub fn adapter_request(&self, label: &str) {
        *lock(&self.by_adapter).entry(label.to_owned()).or_default() += 1;
    }

    pub fn render(&self, adapters_loaded: usize, engine: &EngineStats) -> String {
        let r = Ordering::Relaxed;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP graft_requests_total HTTP responses by status code."
        );
        let _ = writeln!(s, "# TYPE graft_requests_total counter");
        for (code, n) in lock(&self.by_status).iter() {
            let _ = writeln!(s, "graft_requests_total{{status=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP graft_adapter_requests_total Generation requests by adapter (base: none)."
        );
        let _ = writeln!(s, "# TYPE graft_adapter_requests_total counter");
        for (name, n) in lock(&self.by_adapter).iter() {
            let _ = writeln!(
                s,
                "graft_adapter_requests_total{{adapter=\"{}\"}} {n}",
                escape_label(name)
            );
        }
        let counters: [(&str, &str, u64); 7] = [
            (
                "graft_prompt_tokens_total",
                "Prompt tokens of accepted requests.",
                self.prompt_tokens.load(r),
            ),
            (
                "graft_generated_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(r),
            ),
            (
                "graft_aborted_requests_total",
                "Generation requests whose client went away before the end.",
                self.aborted.load(r),
            ),
            (
                "graft_cancelled_requests_total",
                "Requests the engine dropped before they finished (queued or running).",
                engine.cancelled.load(r),
            ),
            (
                "graft_preemptions_total",
                "Sequences preempted because the KV cache was full.",
                engine.preemptions.load(r),
            ),
            (
                "graft_engine_steps_total",
                "Forward steps run by the engine.",
                engine.steps.load(r),
            ),
            (
                "graft_batch_tokens_total",
                "Tokens fed to forward steps (divide by steps for the mean batch).",
                engine.batch_tokens.load(r),
            ),
        ];
        for (name, help, v) in counters {
            metric(&mut s, name, "counter", help, v);
        }
        let total = engine.kv_total_blocks.load(r);
        let used = engine.kv_used_blocks.load(r);
        let gauges: [(&str, &str, usize); 6] = [
            (
                "graft_queue_depth",
                "Requests queued in the engine, waiting for admission.",
                engine.waiting.load(r),
            ),
            (
                "graft_running_sequences",
                "Sequences admitted by the engine.",
                engine.running.load(r),
            ),
            (
                "graft_batch_size",
                "Sequences in the last forward step.",
                engine.last_batch_sequences.load(r),
            ),
            (
                "graft_requests_in_flight",
                "Generation requests open on the HTTP side.",
                self.in_flight.load(r),
            ),
            (
                "graft_kv_blocks_used",
                "KV cache blocks holding keys and values.",
                used,
            ),
            (
                "graft_adapters_loaded",
                "Adapters in the registry.",
                adapters_loaded,
            ),
        ];
        for (name, help, v) in gauges {
            metric(&mut s, name, "gauge", help, v);
        }
        let usage = if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        };
        metric(
            &mut s,
            "graft_kv_cache_usage_ratio",
            "gauge",
            "Fraction of KV cache blocks in use.",
            usage,
        );
        self.ttft.render(
            &mut s,
            "graft_time_to_first_token_seconds",
            "Arrival to first generated token.",
        );
        self.itl.render(
            &mut s,
            "graft_inter_token_latency_seconds",
            "Gap between two generated tokens of a request.",
        );
        self.e2e.render(
            &mut s,
            "graft_e2e_request_latency_seconds",
            "Arrival to last token of finished requests.",
        );
        s
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Times one generation request (TTFT, ITL, E2E) and counts it in flight until dropped.
pub struct InFlight {
    metrics: Arc<Metrics>,
    arrived: Instant,
    last_token: Option<Instant>,
    finished: bool,
}

impl InFlight {
    pub fn new(metrics: Arc<Metrics>, arrived: Instant) -> Self {
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            metrics,
            arrived,
            last_token: None,
            finished: false,
        }
    }

    /// A token was generated.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self.metrics.ttft.observe(now - self.arrived),
            Some(prev) => self.metrics.itl.observe(now - prev),
        }
        self.last_token = Some(now);
        self.metrics
            .generated_tokens
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The request ended; `complete` when it produced its answer (not cancelled).
    pub fn finish(&mut self, complete: bool) {
        if !self.finished && complete {
            self.metrics.e2e.observe(self.arrived.elapsed());
        }
        self.finished = true;
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.metrics.aborted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_with_sum_and_count() {
        let h = Histogram::new(&[0.01, 0.1, 1.0]);
        for ms in [5, 50, 50, 500, 5000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help");
        let want = [
            "x_bucket{le=\"0.01\"} 1",
            "x_bucket{le=\"0.1\"} 3",
            "x_bucket{le=\"1\"} 4",
            "x_bucket{le=\"+Inf\"} 5",
            "x_count 5",
            "# TYPE x histogram",
        ];
        for w in want {
            assert!(s.lines().any(|l| l == w), "{w} missing in\n{s}");
        }
        let sum: f64 = s
            .lines()
            .find_map(|l| l.strip_prefix("x_sum "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 5.605).abs() < 1e-9, "{sum}");
        assert_eq!(h.count(), 5);
    }

    #[test]
    fn in_flight_records_ttft_then_gaps_and_e2e_once() {
        let m = Arc::new(Metrics::default());
        let mut f = InFlight::new(m.clone(), Instant::now());
        for _ in 0..4 {
            f.token();
        }
        f.finish(true);
        f.finish(true);
        drop(f);
        assert_eq!(m.ttft.count(), 1);
        assert_eq!(m.itl.count(), 3);
        assert_eq!(m.e2e.count(), 1);
        assert_eq!(m.generated_tokens.load(Ordering::Relaxed), 4);
        assert_eq!(m.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(m.aborted.load(Ordering::Relaxed), 0);
        // A request dropped before its end counts as aborted, with no E2E sample.
        let f = InFlight::new(m.clone(), Instant::now());
        drop(f);
        assert_eq!(m.aborted.load(Ordering::Relaxed), 1);
        assert_eq!(m.e2e.count(), 1);
    }
}
