//! Soak test: a real `graft serve` under two minutes of mixed traffic while adapters
//! are loaded, replaced, unloaded and reloaded every 100 ms. Every request's outcome
//! is known in advance: traffic on the stable adapters (and the base) must return
//! exactly its reference text; requests naming a churned adapter get either a full
//! answer or a clean 404. Resident memory must not grow.

mod harness;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::*;
use serde_json::{json, Value};

/// Length of the measured soak (after warm-up).
const SOAK: Duration = Duration::from_secs(120);
/// Traffic before the first memory reading: allocator pools, adapter cache, buffers.
const WARM_UP: Duration = Duration::from_secs(15);
const TRAFFIC_CLIENTS: usize = 4;
const CHURN_EVERY: Duration = Duration::from_millis(100);
/// Names only the churn client loads and unloads.
const CHURNED: [&str; 3] = ["C0", "C1", "C2"];

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One request of the stable traffic: endpoint, body (non-streaming form).
#[derive(Clone)]
struct Variant {
    chat: bool,
    body: Value,
}

fn variants() -> Vec<Variant> {
    let adapters = [
        json!({}),
        json!({"model": "S1"}),
        json!({"adapter_id": "S2"}),
        json!({"lora": [{"name": "S1", "scale": 0.5}, {"name": "S2", "scale": 0.5}]}),
    ];
    let mut out = Vec::new();
    for (i, a) in adapters.iter().enumerate() {
        for chat in [false, true] {
            let n = 8 + 4 * i + usize::from(chat) * 3;
            let mut body = if chat {
                json!({"messages": [{"role": "user", "content": format!("Tell me {i}")}]})
            } else {
                json!({"prompt": format!("Once upon a time {i}")})
            };
            body["max_tokens"] = json!(n);
            body["temperature"] = json!(0);
            body["ignore_eos"] = json!(true);
            for (k, v) in a.as_object().unwrap() {
                body[k] = v.clone();
            }
            out.push(Variant { chat, body });
        }
    }
    out
}

fn path(chat: bool) -> &'static str {
    if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

/// Text of a request, streamed or not; panics on anything but a full answer.
fn run_variant(srv: &Server, v: &Variant, stream: bool) -> String {
    if stream {
        let mut b = v.body.clone();
        b["stream"] = json!(true);
        let (text, finish) = srv.stream(path(v.chat), &b).collect(v.chat);
        assert_eq!(finish, "length", "{b}");
        text
    } else {
        let (status, r) = srv.post(path(v.chat), &v.body);
        assert_eq!(status, 200, "{}: {r}", v.body);
        assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
        assert_eq!(r["usage"]["completion_tokens"], v.body["max_tokens"], "{r}");
        if v.chat {
            r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        } else {
            r["choices"][0]["text"].as_str().unwrap().to_owned()
        }
    }
}

#[derive(Default)]
struct Counts {
    stable: AtomicUsize,
    churned_ok: AtomicUsize,
    churned_404: AtomicUsize,
    churn_ops: AtomicUsize,
}

/// Runs every kind of traffic until `stop`; panics (failing the test) on any
/// unexpected outcome.
fn traffic(
    srv: &Arc<Server>,
    refs: &Arc<Vec<String>>,
    counts: &Arc<Counts>,
    stop: &Arc<AtomicBool>,
    root: &std::path::Path,
) {
    let mut threads = Vec::new();
    let vs = Arc::new(variants());
    for c in 0..TRAFFIC_CLIENTS {
        let (srv, refs, counts, stop, vs) = (
            srv.clone(),
            refs.clone(),
            counts.clone(),
            stop.clone(),
            vs.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let k = i % vs.len();
                let stream = (i / vs.len() + c) % 2 == 0;
                let text = run_variant(&srv, &vs[k], stream);
                assert_eq!(text, refs[k], "client {c}, variant {k}, stream {stream}");
                counts.stable.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    // Requests naming churned adapters: a full answer or a clean 404.
    {
        let (srv, counts, stop) = (srv.clone(), counts.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let name = CHURNED[i % CHURNED.len()];
                let stream = i % 2 == 1;
                let body = json!({"model": name, "prompt": "Hello there", "max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": stream});
                let (status, _, text) = srv.request("POST", "/v1/completions", body.to_string().as_bytes(), true);
                match status {
                    200 if stream => {
                        let events: Vec<&str> = text
                            .split("\n\n")
                            .filter_map(|e| e.trim().strip_prefix("data:"))
                            .map(str::trim)
                            .collect();
                        assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
                        let last: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
                        assert_eq!(last["choices"][0]["finish_reason"], "length", "{text}");
                        counts.churned_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    200 => {
                        let v: Value = serde_json::from_str(&text).unwrap();
                        assert_eq!(v["usage"]["completion_tokens"], 12, "{v}");
                        counts.churned_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    404 => {
                        let v: Value = serde_json::from_str(&text).unwrap();
                        assert_eq!(v["error"]["code"], "model_not_found", "{v}");
                        counts.churned_404.fetch_add(1, Ordering::Relaxed);
                    }
                    s => panic!("churned adapter {name}: unexpected {s}: {text}"),
                }
                i += 1;
            }
        }));
    }
    // Churn: per name, load -> replace (compare-and-set) -> unload -> reload -> ...
    {
        let (srv, counts, stop) = (srv.clone(), counts.clone(), stop.clone());
        let files = [root.join("a.gguf"), root.join("b")];
        threads.push(std::thread::spawn(move || {
            let mut generation: HashMap<&str, Option<u64>> =
                CHURNED.iter().map(|n| (*n, None)).collect();
            let mut tick = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let name = CHURNED[tick % CHURNED.len()];
                let file = files[(tick / CHURNED.len()) % 2]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let round = (tick / CHURNED.len()) % 3;
                let (status, v) = match (generation[name], round) {
                    (None, _) => srv.post(
                        "/v1/load_lora_adapter",
                        &json!({"lora_name": name, "lora_path": file}),
                    ),
                    (Some(g), 0 | 1) => srv.post(
                        "/v1/load_lora_adapter",
                        &json!({"lora_name": name, "lora_path": file, "expected_generation": g}),
                    ),
                    (Some(_), _) => {
                        srv.post("/v1/unload_lora_adapter", &json!({"lora_name": name}))
                    }
                };
                assert_eq!(status, 200, "churn {name} round {round}: {v}");
                let new_gen = match v["status"].as_str() {
                    Some("loaded") | Some("replaced") => Some(v["generation"].as_u64().unwrap()),
                    Some("unloaded") => None,
                    other => panic!("churn {name}: status {other:?}: {v}"),
                };
                generation.insert(name, new_gen);
                counts.churn_ops.fetch_add(1, Ordering::Relaxed);
                tick += 1;
                std::thread::sleep(CHURN_EVERY);
            }
            // Each phase starts and ends with no churned adapter loaded.
            for (name, g) in generation {
                if g.is_some() {
                    let (status, v) =
                        srv.post("/v1/unload_lora_adapter", &json!({"lora_name": name}));
                    assert_eq!(status, 200, "{v}");
                }
            }
        }));
    }
    for t in threads {
        t.join()
            .expect("a client saw an unexpected outcome (see its panic above)");
    }
}

#[test]
fn two_minutes_of_mixed_traffic_with_adapter_churn() {
    let root = adapter_root("soak");
    let srv = Server::start(&[
        "--adapter",
        &format!("S1={}", lora_a().display()),
        "--adapter",
        &format!("S2={}", lora_b().display()),
        "--adapter-root",
        root.to_str().unwrap(),
        "--allow-adapter-loading",
        "--max-loras",
        "4",
    ]);
    let pid = srv.child.id();
    // References: each variant alone on an idle server.
    let refs: Arc<Vec<String>> = Arc::new(
        variants()
            .iter()
            .map(|v| run_variant(&srv, v, false))
            .collect(),
    );
    let distinct: std::collections::HashSet<&String> = refs.iter().collect();
    assert!(distinct.len() >= 6, "variants should differ: {refs:?}");
    let srv = Arc::new(srv);
    let counts = Arc::new(Counts::default());

    let phase = |d: Duration| {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let timer = std::thread::spawn(move || {
            std::thread::sleep(d);
            s2.store(true, Ordering::Relaxed);
        });
        traffic(&srv, &refs, &counts, &stop, &root);
        timer.join().unwrap();
    };
    // Warm-up opens with a burst larger than any moment of the soak, so buffers that
    // grow to the largest batch seen (the engine's scratch, per-step deltas) reach
    // their high-water mark before the first reading.
    let burst: Vec<_> = (0..24)
        .map(|i| {
            let srv = srv.clone();
            std::thread::spawn(move || {
                let names = ["", "S1", "S2", "S1"];
                let body = json!({"model": names[i % 4], "prompt": "Once upon a time there was a story ".repeat(12), "max_tokens": 16, "temperature": 0, "ignore_eos": true});
                let (status, v) = srv.post("/v1/completions", &body);
                assert_eq!(status, 200, "{v}");
            })
        })
        .collect();
    for b in burst {
        b.join().unwrap();
    }
    phase(WARM_UP);
    // Memory is read idle, both times.
    std::thread::sleep(Duration::from_millis(500));
    let rss_warm = rss_kib(pid);
    let before = counts.stable.load(Ordering::Relaxed);
    let start = Instant::now();
    // RSS every 10 s under load, printed for the record (the assertion uses idle readings).
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while sampling.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                if samples.len() < (start.elapsed().as_secs() / 10) as usize {
                    samples.push((rss_kib(pid), threads(pid)));
                }
            }
            samples
        })
    };
    phase(SOAK);
    let elapsed = start.elapsed();
    sampling.store(false, Ordering::Relaxed);
    println!(
        "soak: VmRSS under load every 10 s (KiB): {:?}",
        sampler.join().unwrap()
    );
    std::thread::sleep(Duration::from_millis(500));
    let rss_end = rss_kib(pid);
    let stable = counts.stable.load(Ordering::Relaxed) - before;
    println!(
        "soak: {:.0} s, {stable} stable requests, {} churned ok, {} churned 404, {} churn ops; VmRSS after warm-up {rss_warm} KiB, at the end {rss_end} KiB ({:+.1}%)",
        elapsed.as_secs_f64(),
        counts.churned_ok.load(Ordering::Relaxed),
        counts.churned_404.load(Ordering::Relaxed),
        counts.churn_ops.load(Ordering::Relaxed),
        (rss_end as f64 / rss_warm as f64 - 1.0) * 100.0
    );
    assert!(
        stable > 100,
        "too little traffic to mean anything: {stable}"
    );
    assert!(counts.churned_ok.load(Ordering::Relaxed) > 0);
    assert!(counts.churn_ops.load(Ordering::Relaxed) >= 300);
    assert!(
        rss_end as f64 <= rss_warm as f64 * 1.10,
        "resident memory grew: {rss_warm} KiB after warm-up, {rss_end} KiB at the end"
    );
    // Nothing lost, nothing left behind.
    let (_, m) = srv.get("/metrics");
    for line in m.lines().filter(|l| l.starts_with("graft_requests_total")) {
        assert!(!line.contains("status=\"5"), "5xx seen: {line}");
    }
    for (name, want) in [
        ("graft_queue_depth", 0.0),
        ("graft_running_sequences", 0.0),
        ("graft_kv_blocks_used", 0.0),
        ("graft_requests_in_flight", 0.0),
        ("graft_cancelled_requests_total", 0.0),
        ("graft_aborted_requests_total", 0.0),
    ] {
        assert_eq!(metric_value(&m, name), want, "{name}:\n{m}");
    }
    let _ = std::fs::remove_dir_all(root);
}
