//! Prometheus counters and gauges, rendered as text at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Metrics {
    /// Responses by HTTP status.
    by_status: Mutex<BTreeMap<u16, u64>>,
    /// Generation requests accepted by the engine, by adapter label (`base` for none).
    by_adapter: Mutex<BTreeMap<String, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests queued in the engine that have produced nothing yet.
    pub waiting: AtomicUsize,
    /// Requests producing tokens.
    pub running: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay meaningful after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub fn response(&self, status: u16) {
        *lock(&self.by_status).entry(status).or_default() += 1;
    }

    pub fn adapter_request(&self, label: &str) {
        *lock(&self.by_adapter).entry(label.to_owned()).or_default() += 1;
    }

    pub fn render(&self, adapters_loaded: usize) -> String {
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
        let counters = [
            (
                "graft_prompt_tokens_total",
                "Prompt tokens of accepted requests.",
                &self.prompt_tokens,
            ),
            (
                "graft_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            let _ = writeln!(s, "{name} {}", v.load(Ordering::Relaxed));
        }
        let gauges = [
            (
                "graft_queue_depth",
                "Requests waiting for their first token.",
                self.waiting.load(Ordering::Relaxed),
            ),
            (
                "graft_running_sequences",
                "Requests generating tokens.",
                self.running.load(Ordering::Relaxed),
            ),
            (
                "graft_adapters_loaded",
                "Adapters in the registry.",
                adapters_loaded,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} gauge");
            let _ = writeln!(s, "{name} {v}");
        }
        s
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Tracks one request in the `waiting` / `running` gauges until dropped.
pub struct InFlight {
    metrics: Arc<Metrics>,
    running: bool,
}

impl InFlight {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.waiting.fetch_add(1, Ordering::Relaxed);
        InFlight {
            metrics,
            running: false,
        }
    }

    /// The first event arrived: the request left the queue.
    pub fn started(&mut self) {
        if !self.running {
            self.running = true;
            self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            self.metrics.running.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let g = if self.running {
            &self.metrics.running
        } else {
            &self.metrics.waiting
        };
        g.fetch_sub(1, Ordering::Relaxed);
    }
}
