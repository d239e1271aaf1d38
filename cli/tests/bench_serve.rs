//! `graft bench serve` against a real `graft serve` with two adapters.

mod harness;

use std::process::Command;

use harness::*;
use serde_json::Value;

fn bench(srv: &Server, extra: &[&str]) -> Value {
    let url = format!("http://127.0.0.1:{}", srv.port);
    let out = Command::new(env!("CARGO_BIN_EXE_graft"))
        .args(["bench", "serve", "--url", &url])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "graft bench serve failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn bench_serve_reports_every_metric_for_a_multi_adapter_run() {
    let srv = Server::start(&[
        "--adapter",
        &format!("A={}", lora_a().display()),
        "--adapter",
        &format!("B={}", lora_b().display()),
    ]);
    let dir = std::env::temp_dir().join(format!("graft-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json_path, svg_path) = (dir.join("r.json"), dir.join("r.svg"));
    let n = 12;
    let v = bench(
        &srv,
        &[
            "--num-prompts",
            &n.to_string(),
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--adapters",
            "2",
            "--popularity",
            "skewed",
            "--request-rate",
            "200",
            "--max-concurrency",
            "4",
            "--seed",
            "5",
            "--out",
            json_path.to_str().unwrap(),
            "--plot",
            svg_path.to_str().unwrap(),
        ],
    );
    assert_eq!(v["completed"], n, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["adapter_names"], serde_json::json!(["A", "B"]));
    // ignore_eos: exactly output_len tokens each, counted by the server's usage.
    assert_eq!(v["total_output_tokens"], n * 8, "{v}");
    // Prompt words are calibrated to about 16 tokens each.
    let input = v["total_input_tokens"].as_u64().unwrap();
    assert!((n as u64 * 12..=n as u64 * 20).contains(&input), "{v}");
    for name in ["ttft", "tpot", "itl", "e2el"] {
        let get = |stat: &str| {
            v[format!("{stat}_{name}_ms")]
                .as_f64()
                .unwrap_or_else(|| panic!("{stat}_{name}_ms missing: {v}"))
        };
        let (mean, median, p99) = (get("mean"), get("median"), get("p99"));
        assert!(median > 0.0 && mean > 0.0, "{name}: {v}");
        assert!(p99 >= median, "{name}: p99 {p99} < median {median}");
        assert!(get("std") >= 0.0);
    }
    // A request's first token comes before its last.
    assert!(v["median_e2el_ms"].as_f64() >= v["median_ttft_ms"].as_f64());
    for name in [
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "duration",
    ] {
        assert!(v[name].as_f64().unwrap() > 0.0, "{name}: {v}");
    }
    assert!(v["total_token_throughput"].as_f64() > v["output_throughput"].as_f64());
    // The saved file keeps every request; the server saw the adapters used.
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(saved["ttfts"].as_array().unwrap().len(), n);
    // One gap per streamed chunk after the first: at most one chunk per token plus
    // the final one (pieces that complete no character are not sent).
    for itl in saved["itls"].as_array().unwrap() {
        assert!((1..=8).contains(&itl.as_array().unwrap().len()), "{itl}");
    }
    let used = saved["adapter_of_request"].as_array().unwrap();
    assert!(used.iter().all(|a| a == "A" || a == "B"));
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<path").count(), 3);
    let (_, metrics) = srv.get("/metrics");
    for name in ["A", "B"] {
        let count = used.iter().filter(|a| *a == name).count();
        let line = format!("graft_adapter_requests_total{{adapter=\"{name}\"}} {count}");
        assert!(
            count == 0 || metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    // Same seed, same workload.
    let again = bench(
        &srv,
        &[
            "--num-prompts",
            &n.to_string(),
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--adapters",
            "2",
            "--popularity",
            "skewed",
            "--seed",
            "5",
            "--out",
            json_path.to_str().unwrap(),
        ],
    );
    assert_eq!(again["total_input_tokens"], v["total_input_tokens"]);
    let saved2: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(saved2["adapter_of_request"], saved["adapter_of_request"]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bench_serve_refuses_more_adapters_than_the_server_has() {
    let srv = Server::start(&["--adapter", &format!("A={}", lora_a().display())]);
    let url = format!("http://127.0.0.1:{}", srv.port);
    let out = Command::new(env!("CARGO_BIN_EXE_graft"))
        .args(["bench", "serve", "--url", &url, "--adapters", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only 1 adapters"), "{err}");
}
