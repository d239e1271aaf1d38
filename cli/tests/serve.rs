//! End-to-end tests of `graft serve`: the real binary on an ephemeral port.

mod harness;

use std::process::Command;
use std::sync::mpsc;

use harness::*;
use serde_json::{json, Value};

/// `graft run` stdout without its trailing newline.
fn graft_run(prompt: &str, n: usize, adapter: Option<String>, chat: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_graft"));
    cmd.arg("run").arg("-m").arg(base()).args([
        "-p",
        prompt,
        "-n",
        &n.to_string(),
        "--temp",
        "0",
        "-t",
        "1",
    ]);
    if let Some(a) = adapter {
        cmd.args(["--adapter", &a]);
    }
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    s.strip_suffix('\n').unwrap().to_owned()
}

fn adapter_args() -> Vec<String> {
    vec![
        "--adapter".into(),
        format!("A={}", lora_a().display()),
        "--adapter".into(),
        format!("B={}", lora_b().display()),
    ]
}

fn start_with_adapters(extra: &[&str]) -> Server {
    let mut args = adapter_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

const PROMPTS: [&str; 2] = ["Hello world", "The quick brown fox"];

#[test]
fn greedy_http_output_equals_graft_run() {
    let srv = start_with_adapters(&[]);
    let n = 12;
    let a = lora_a().display().to_string();
    let b = lora_b().display().to_string();
    for prompt in PROMPTS {
        let body = |extra: Value| {
            let mut v = json!({"prompt": prompt, "max_tokens": n, "temperature": 0});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let base_text = srv.complete(&body(json!({})));
        assert_eq!(
            base_text,
            graft_run(prompt, n, None, false),
            "base {prompt:?}"
        );
        let via_base_id = srv.complete(&body(json!({"model": "llama-gqa-Q8_0"})));
        assert_eq!(via_base_id, base_text);
        let a_text = srv.complete(&body(json!({"model": "A"})));
        assert_eq!(a_text, graft_run(prompt, n, Some(a.clone()), false));
        assert_ne!(a_text, base_text, "the adapter changes nothing");
        assert_eq!(srv.complete(&body(json!({"adapter_id": "A"}))), a_text);
        assert_eq!(
            srv.complete(&body(json!({"lora": [{"name": "A", "scale": 1.0}]}))),
            a_text
        );
        let b_text = srv.complete(&body(json!({"model": "B"})));
        assert_eq!(b_text, graft_run(prompt, n, Some(b.clone()), false));
        let half = srv.complete(&body(json!({"lora": [{"id": "A", "scale": 0.5}]})));
        assert_eq!(half, graft_run(prompt, n, Some(format!("{a}:0.5")), false));
    }
    // Chat renders like `graft run --chat`.
    let msgs = json!([{"role": "user", "content": "Hi there"}]);
    let c = srv.chat(&json!({"messages": msgs, "max_tokens": n, "temperature": 0}));
    assert_eq!(c, graft_run("Hi there", n, None, true));
    let c = srv.chat(&json!({"model": "A", "messages": msgs, "max_tokens": n, "temperature": 0}));
    assert_eq!(c, graft_run("Hi there", n, Some(a), true));

    // Usage counts and the response shape.
    let (status, v) = srv.post(
        "/v1/completions",
        &json!({"prompt": "Hello world", "max_tokens": 5, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(status, 200);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "llama-gqa-Q8_0");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + 5)
    );

    // /v1/models lists the base and both adapters.
    let (status, text) = srv.get("/v1/models");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama-gqa-Q8_0", "A", "B"]);
    assert_eq!(v["data"][1]["parent"], "llama-gqa-Q8_0");
    assert_eq!(v["data"][1]["root"], lora_a().display().to_string());

    // Without --allow-adapter-loading the lifecycle routes are refused.
    for (path, body) in [
        (
            "/v1/load_lora_adapter",
            json!({"lora_name": "C", "lora_path": "a.gguf"}),
        ),
        ("/v1/unload_lora_adapter", json!({"lora_name": "A"})),
    ] {
        let (status, v) = srv.post(path, &body);
        assert_eq!(status, 403, "{v}");
        assert_eq!(v["error"]["code"], "adapter_loading_disabled");
    }
    let (status, text) = srv.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        text.contains("graft_adapter_requests_total{adapter=\"A\"}"),
        "{text}"
    );
    assert!(
        text.contains("graft_requests_total{status=\"403\"} 2"),
        "{text}"
    );
}

#[test]
fn concurrent_clients_get_their_solo_outputs() {
    let srv = start_with_adapters(&["--max-loras", "3"]);
    let variants = [
        json!({}),
        json!({"model": "A"}),
        json!({"adapter_id": "B"}),
        json!({"lora": [{"name": "A", "scale": 0.5}]}),
    ];
    let body = |i: usize| {
        let mut v = json!({"prompt": PROMPTS[i % 2], "max_tokens": 16, "temperature": 0, "ignore_eos": true});
        for (k, x) in variants[(i / 2) % 4].as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let solo: Vec<String> = (0..8).map(|i| srv.complete(&body(i))).collect();
    let distinct: std::collections::HashSet<&String> = solo.iter().collect();
    assert!(distinct.len() >= 6, "variants should differ: {solo:?}");
    let srv = std::sync::Arc::new(srv);
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let srv = srv.clone();
            let b = body(i);
            std::thread::spawn(move || srv.complete(&b))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap(), solo[i % 8], "client {i}");
    }
    // Seeded sampling is reproducible too.
    let sampled =
        json!({"prompt": "Hello", "max_tokens": 16, "temperature": 0.9, "seed": 7, "model": "A"});
    assert_eq!(srv.complete(&sampled), srv.complete(&sampled));
}

#[test]
fn streaming_chunks_concatenate_to_the_full_text() {
    let srv = start_with_adapters(&[]);
    for model in ["llama-gqa-Q8_0", "A"] {
        let body =
            json!({"model": model, "prompt": "Hello world", "max_tokens": 20, "temperature": 0});
        let full = srv.complete(&body);
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let (text, finish) = srv.stream("/v1/completions", &sbody).collect(false);
        assert_eq!(text, full);
        assert!(finish == "length" || finish == "stop");

        let chat = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "temperature": 0});
        let full = srv.chat(&chat);
        let mut schat = chat.clone();
        schat["stream"] = json!(true);
        schat["stream_options"] = json!({"include_usage": true});
        let mut s = srv.stream("/v1/chat/completions", &schat);
        let first: Value = serde_json::from_str(&s.next_event().unwrap()).unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let mut text = first["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let mut finish = None;
        let mut usage = None;
        let mut done = false;
        while let Some(d) = s.next_event() {
            if d == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(&d).unwrap();
            if v["usage"].is_object() {
                usage = Some(v["usage"].clone());
            }
            text.push_str(&piece(&d, true, &mut finish));
        }
        assert!(done);
        assert_eq!(text, full);
        assert!(finish.is_some());
        let usage = usage.expect("include_usage sends a usage chunk");
        assert!(usage["completion_tokens"].as_u64().unwrap() > 0);
    }
}

#[test]
fn adapters_hot_swap_while_clients_stream() {
    let root = adapter_root("swap");
    let srv = Server::start(&[
        "--adapter-root",
        root.to_str().unwrap(),
        "--allow-adapter-loading",
    ]);
    let (status, v) = srv.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "A", "lora_path": "a.gguf"}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "loaded");
    let gen_a = v["generation"].as_u64().unwrap();
    let body = json!({"model": "A", "prompt": "Hello world", "max_tokens": 96, "temperature": 0, "ignore_eos": true});
    let want = srv.complete(&body);
    let (status, v) = srv.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "B", "lora_path": root.join("b").to_str().unwrap()}),
    );
    assert_eq!(status, 200, "{v}");
    let want_b = srv.complete(&json!({"model": "B", "prompt": "Hello world", "max_tokens": 96, "temperature": 0, "ignore_eos": true}));
    assert_ne!(want, want_b);

    let srv = std::sync::Arc::new(srv);
    let (started_tx, started_rx) = mpsc::channel();
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let srv = srv.clone();
            let mut b = body.clone();
            b["stream"] = json!(true);
            let started = started_tx.clone();
            std::thread::spawn(move || {
                let mut s = srv.stream("/v1/completions", &b);
                // The first chunk proves the request was admitted with its version.
                let first = s.next_event().unwrap();
                let mut finish = None;
                let mut text = piece(&first, false, &mut finish);
                started.send(i).unwrap();
                let (rest, finish) = s.collect(false);
                text.push_str(&rest);
                (text, finish)
            })
        })
        .collect();
    for _ in 0..8 {
        started_rx.recv().unwrap();
    }
    // Replace A by B's file (compare-and-set), then unload it, while they stream.
    let (status, v) = srv.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "A", "lora_path": "b", "expected_generation": gen_a}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "replaced");
    let (status, v) = srv.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "A", "lora_path": "a.gguf", "expected_generation": gen_a}),
    );
    assert_eq!(status, 409, "stale generation: {v}");
    assert_eq!(v["error"]["code"], "generation_mismatch");
    // New requests see the new version.
    assert_eq!(
        srv.complete(&json!({"model": "A", "prompt": "Hello world", "max_tokens": 96, "temperature": 0, "ignore_eos": true})),
        want_b
    );
    let (status, v) = srv.post("/v1/unload_lora_adapter", &json!({"lora_name": "A"}));
    assert_eq!(status, 200, "{v}");
    for c in clients {
        let (text, finish) = c.join().unwrap();
        assert_eq!(text, want, "an in-flight request kept its adapter version");
        assert_eq!(finish, "length");
    }
    let (status, v) = srv.post("/v1/completions", &body);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (status, v) = srv.post("/v1/unload_lora_adapter", &json!({"lora_name": "A"}));
    assert_eq!(status, 404, "{v}");
    let (_, text) = srv.get("/metrics");
    for line in text
        .lines()
        .filter(|l| l.starts_with("graft_requests_total"))
    {
        assert!(!line.contains("status=\"5"), "5xx seen: {line}");
    }
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn malformed_requests_get_json_4xx() {
    let root = adapter_root("bad");
    #[cfg(unix)]
    std::os::unix::fs::symlink(lora_a(), root.join("escape.gguf")).unwrap();
    let srv = Server::start(&[
        "--adapter-root",
        root.to_str().unwrap(),
        "--allow-adapter-loading",
        "--api-key",
        "sekrit",
        "--max-body",
        "4096",
        "--kv-blocks",
        "64",
    ]);
    let (status, v) = srv.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "A", "lora_path": "a.gguf"}),
    );
    assert_eq!(status, 200, "{v}");
    let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(5000));
    let cases: Vec<(&str, &str, String, bool, u16, &str)> = vec![
        (
            "POST",
            "/v1/completions",
            r#"{"prompt":"#.into(),
            true,
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/v1/completions",
            "[1, 2]".into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": 5}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "max_tokens": -1}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "max_tokens": "8"}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "temperature": -0.5}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "top_p": 1.5}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "top_k": -1}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "seed": -3}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "stop": 5}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "frequency_penalty": 3}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "n": 2}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"max_tokens": 4}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "max_tokens": 100000}"#.into(),
            true,
            400,
            "context_length_exceeded",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "model": "nope"}"#.into(),
            true,
            404,
            "model_not_found",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "adapter_id": "nope"}"#.into(),
            true,
            404,
            "adapter_not_found",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "lora": [{"name": "nope", "scale": 1}]}"#.into(),
            true,
            404,
            "adapter_not_found",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "lora": [{"id": 7}]}"#.into(),
            true,
            404,
            "adapter_not_found",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a", "lora": [{"scale": 1}]}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/completions",
            big,
            true,
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"prompt": "a"}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": []}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user"}], "max_tokens": -2}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "X", "lora_path": "../etc/passwd"}"#.into(),
            true,
            403,
            "path_outside_root",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "X", "lora_path": "b/../../x"}"#.into(),
            true,
            403,
            "path_outside_root",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "X", "lora_path": "/etc/passwd"}"#.into(),
            true,
            403,
            "path_outside_root",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "X", "lora_path": "escape.gguf"}"#.into(),
            true,
            403,
            "path_outside_root",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "X", "lora_path": "missing.gguf"}"#.into(),
            true,
            404,
            "adapter_path_not_found",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "X", "lora_path": "qwen2.gguf"}"#.into(),
            true,
            400,
            "invalid_adapter",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "X"}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "", "lora_path": "a.gguf"}"#.into(),
            true,
            400,
            "invalid_parameter",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "A", "lora_path": "a.gguf"}"#.into(),
            true,
            409,
            "adapter_exists",
        ),
        (
            "POST",
            "/v1/load_lora_adapter",
            r#"{"lora_name": "A", "lora_path": "a.gguf", "expected_generation": 999}"#.into(),
            true,
            409,
            "generation_mismatch",
        ),
        (
            "POST",
            "/v1/unload_lora_adapter",
            r#"{"lora_name": "nope"}"#.into(),
            true,
            404,
            "adapter_not_found",
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "a"}"#.into(),
            false,
            401,
            "invalid_api_key",
        ),
        (
            "GET",
            "/v1/models",
            String::new(),
            false,
            401,
            "invalid_api_key",
        ),
        (
            "GET",
            "/v1/nothing",
            String::new(),
            true,
            404,
            "route_not_found",
        ),
        (
            "GET",
            "/v1/completions",
            String::new(),
            true,
            405,
            "method_not_allowed",
        ),
    ];
    assert!(cases.len() >= 20);
    for (method, path, body, auth, want_status, want_code) in &cases {
        let (status, _, text) = srv.request(method, path, body.as_bytes(), *auth);
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path} {body}: not JSON ({e}): {text}"));
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (*want_status, Some(*want_code)),
            "{method} {path} {body}: {v}"
        );
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].is_string());
    }
    // A wrong key is refused too; /health needs none and is still fine.
    let r = Response::read(srv.connect_as("GET", "/v1/models", b"", Some("wrong")));
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let (status, _, text) = srv.request("GET", "/health", b"", false);
    assert_eq!((status, text.as_str()), (200, r#"{"status":"ok"}"#));
    // The server still generates, and with the key, the loaded adapter works.
    let t = srv.complete(&json!({"prompt": "Hello", "max_tokens": 4, "model": "A"}));
    assert!(!t.is_empty());
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn queue_full_gets_429_with_retry_after() {
    // No waiting room at all: every request beyond the running ones is refused.
    let srv = start_with_adapters(&["--max-queue", "0"]);
    let (status, headers, text) = srv.request(
        "POST",
        "/v1/completions",
        br#"{"prompt": "Hello", "max_tokens": 4}"#,
        true,
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    assert!(headers.iter().any(|(k, _)| k == "retry-after"));
}

#[test]
fn sigterm_drains_open_streams_then_exits() {
    let mut srv = start_with_adapters(&[]);
    let body = json!({"model": "A", "prompt": "Hello world", "max_tokens": 64, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut want_body = body.clone();
    want_body["stream"] = json!(false);
    let want = srv.complete(&want_body);
    let mut s = srv.stream("/v1/completions", &body);
    let first = s.next_event().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &srv.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut finish = None;
    let mut text = piece(&first, false, &mut finish);
    let (rest, finish) = s.collect(false);
    text.push_str(&rest);
    assert_eq!((text.as_str(), finish.as_str()), (want.as_str(), "length"));
    let exit = srv.child.wait().unwrap();
    assert!(exit.success(), "graft serve exited with {exit}");
}

#[test]
fn client_disconnect_cancels_queued_requests_and_frees_their_slot() {
    // One running sequence: everything after the long request waits in the queue.
    let srv = start_with_adapters(&["--max-running", "1", "--kv-blocks", "1024"]);
    let long_tokens = 2000;
    let long = json!({"prompt": "Hello world", "max_tokens": long_tokens, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut running = srv.stream("/v1/completions", &long);
    let first = running.next_event().unwrap();
    // A streaming request and a plain one queue behind it.
    let queued = json!({"model": "A", "prompt": "Hi", "max_tokens": 8, "stream": true});
    let q1 = srv.stream("/v1/completions", &queued);
    let mut plain = queued.clone();
    plain["stream"] = json!(false);
    let q2 = srv.connect(
        "POST",
        "/v1/completions",
        plain.to_string().as_bytes(),
        true,
    );
    wait_metrics(&srv, "two queued requests", |t| {
        metric_value(t, "graft_queue_depth") == 2.0
    });
    // Both clients leave while their requests are still queued.
    drop(q1);
    drop(q2);
    // The cancel counter moves at the cancel, the queue gauge at the engine's next
    // stats refresh: wait for both to settle.
    let text = wait_metrics(
        &srv,
        "the queued requests to be cancelled and dequeued",
        |t| {
            metric_value(t, "graft_cancelled_requests_total") == 2.0
                && metric_value(t, "graft_queue_depth") == 0.0
        },
    );
    assert_eq!(metric_value(&text, "graft_queue_depth"), 0.0, "{text}");
    assert_eq!(
        metric_value(&text, "graft_running_sequences"),
        1.0,
        "the long request must still be running when the queued ones are cancelled \
         (else this test proves nothing): {text}"
    );
    assert_eq!(metric_value(&text, "graft_aborted_requests_total"), 2.0);
    // The long request is unaffected and ends with all its tokens.
    let mut finish = None;
    let mut n_chunks = usize::from(!piece(&first, false, &mut finish).is_empty());
    let mut done = false;
    while let Some(d) = running.next_event() {
        if d == "[DONE]" {
            done = true;
            continue;
        }
        n_chunks += usize::from(!piece(&d, false, &mut finish).is_empty());
    }
    assert!(done && finish.as_deref() == Some("length"), "{finish:?}");
    assert!(n_chunks > 0);
    // Their slots are free: a new request is admitted and completes.
    let t =
        srv.complete(&json!({"model": "A", "prompt": "Hi", "max_tokens": 8, "ignore_eos": true}));
    assert!(!t.is_empty());
    let text = wait_metrics(&srv, "an idle engine", |t| {
        metric_value(t, "graft_running_sequences") == 0.0
    });
    assert_eq!(metric_value(&text, "graft_cancelled_requests_total"), 2.0);
    assert_eq!(metric_value(&text, "graft_kv_blocks_used"), 0.0);
    assert_eq!(metric_value(&text, "graft_requests_in_flight"), 0.0);
    // Latency histograms: one TTFT and E2E sample per finished request, one ITL
    // sample per later token.
    assert_eq!(
        metric_value(&text, "graft_time_to_first_token_seconds_count"),
        2.0
    );
    assert_eq!(
        metric_value(&text, "graft_e2e_request_latency_seconds_count"),
        2.0
    );
    assert_eq!(
        metric_value(&text, "graft_inter_token_latency_seconds_count"),
        (long_tokens - 1 + 7) as f64
    );
    assert!(
        text.contains("graft_inter_token_latency_seconds_bucket{le=\"+Inf\"} 2006"),
        "{text}"
    );
    assert!(metric_value(&text, "graft_e2e_request_latency_seconds_sum") > 0.0);
    assert_eq!(
        metric_value(&text, "graft_generated_tokens_total"),
        (long_tokens + 8) as f64
    );
    assert!(metric_value(&text, "graft_engine_steps_total") >= (long_tokens + 8) as f64);
    for name in [
        "graft_batch_size",
        "graft_kv_cache_usage_ratio",
        "graft_preemptions_total",
        "graft_batch_tokens_total",
        "graft_adapters_loaded",
    ] {
        metric_value(&text, name);
    }
}
