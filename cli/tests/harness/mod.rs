//! A `graft serve` process on an ephemeral port and a minimal HTTP/1.1 client over
//! `TcpStream` (no client crate needed for JSON and SSE), shared by the server tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

pub fn models() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/models");
    assert!(
        dir.is_dir(),
        "conformance suite missing: expected {}",
        dir.display()
    );
    dir
}

pub fn base() -> PathBuf {
    models().join("llama-gqa-Q8_0.gguf")
}

pub fn lora_a() -> PathBuf {
    models().join("llama-gqa-lora-all-r8.gguf")
}

pub fn lora_b() -> PathBuf {
    models().join("llama-gqa-lora-qv-r4-peft")
}

/// An adapter root holding copies of the test adapters (and the qwen2 one).
pub fn adapter_root(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("graft-serve-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("b")).unwrap();
    std::fs::copy(lora_a(), dir.join("a.gguf")).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(lora_b().join(f), dir.join("b").join(f)).unwrap();
    }
    std::fs::copy(
        models().join("qwen2-lora-all-r8.gguf"),
        dir.join("qwen2.gguf"),
    )
    .unwrap();
    dir
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub key: Option<String>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_graft"));
        cmd.arg("serve")
            .arg("-m")
            .arg(base())
            .args(["--port", "0", "--threads", "1"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start graft serve");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut port = None;
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.split("listening on http://").nth(1) {
                port = rest.rsplit(':').next().and_then(|p| p.trim().parse().ok());
                break;
            }
            seen.push(line);
        }
        let Some(port) = port else {
            let _ = child.kill();
            panic!("graft serve did not start: {}", seen.join("\n"));
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let key = extra
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| extra[i + 1].to_owned());
        Server { child, port, key }
    }

    pub fn connect(&self, method: &str, path: &str, body: &[u8], auth: bool) -> TcpStream {
        self.connect_as(method, path, body, self.key.as_deref().filter(|_| auth))
    }

    pub fn connect_as(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        key: Option<&str>,
    ) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        // A hung server fails the test instead of hanging it.
        s.set_read_timeout(Some(std::time::Duration::from_secs(300)))
            .unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(k) = key {
            head.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        s
    }

    /// Status, headers (lower-case names) and the whole body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        auth: bool,
    ) -> (u16, Vec<(String, String)>, String) {
        let s = self.connect(method, path, body, auth);
        let mut r = Response::read(s);
        let mut out = Vec::new();
        while let Some(chunk) = r.next_chunk() {
            out.extend_from_slice(&chunk);
        }
        (r.status, r.headers, String::from_utf8(out).unwrap())
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, text) = self.request("POST", path, body.to_string().as_bytes(), true);
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (status, v)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let (status, _, text) = self.request("GET", path, b"", true);
        (status, text)
    }

    /// The text of a successful non-streaming completion.
    pub fn complete(&self, body: &Value) -> String {
        let (status, v) = self.post("/v1/completions", body);
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_owned()
    }

    pub fn chat(&self, body: &Value) -> String {
        let (status, v) = self.post("/v1/chat/completions", body);
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Opens a streaming request; its SSE `data:` payloads come from `next_event`.
    pub fn stream(&self, path: &str, body: &Value) -> Sse {
        let s = self.connect("POST", path, body.to_string().as_bytes(), true);
        let r = Response::read(s);
        assert_eq!(r.status, 200);
        Sse {
            r,
            buf: String::new(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 response read incrementally (chunked or with Content-Length).
pub struct Response {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
    remaining: Option<usize>,
    done: bool,
}

impl Response {
    pub fn read(s: TcpStream) -> Response {
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let chunked = get("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let remaining = get("content-length").and_then(|v| v.parse().ok());
        Response {
            reader,
            status,
            headers,
            chunked,
            remaining,
            done: false,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn next_chunk(&mut self) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        if self.chunked {
            let mut size = String::new();
            self.reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
            if n == 0 {
                self.done = true;
                return None;
            }
            let mut buf = vec![0; n + 2];
            self.reader.read_exact(&mut buf).unwrap();
            buf.truncate(n);
            Some(buf)
        } else {
            self.done = true;
            let mut buf = Vec::new();
            match self.remaining {
                Some(n) => {
                    buf.resize(n, 0);
                    self.reader.read_exact(&mut buf).unwrap();
                }
                None => {
                    self.reader.read_to_end(&mut buf).unwrap();
                }
            }
            Some(buf)
        }
    }
}

pub struct Sse {
    r: Response,
    buf: String,
}

impl Sse {
    /// The next `data:` payload, or None at the end of the body.
    pub fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..i + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if data.is_empty() {
                    continue; // comments / keep-alives
                }
                return Some(data.join("\n"));
            }
            let chunk = self.r.next_chunk()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every payload to the end; panics unless the stream ends with `[DONE]`.
    /// Returns the concatenated text and the finish reason.
    pub fn collect(mut self, chat: bool) -> (String, String) {
        let mut text = String::new();
        let mut finish = None;
        let mut done = false;
        while let Some(d) = self.next_event() {
            assert!(!done, "data after [DONE]: {d}");
            if d == "[DONE]" {
                done = true;
                continue;
            }
            text.push_str(&piece(&d, chat, &mut finish));
        }
        assert!(done, "stream did not end with [DONE]");
        (text, finish.expect("no finish_reason in the stream"))
    }
}

/// The text of one SSE chunk (completion `text` or chat `delta.content`).
pub fn piece(data: &str, chat: bool, finish: &mut Option<String>) -> String {
    let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
    assert!(v.get("error").is_none(), "error in stream: {v}");
    let Some(c) = v["choices"].get(0) else {
        return String::new(); // the usage chunk
    };
    if let Some(f) = c["finish_reason"].as_str() {
        *finish = Some(f.to_owned());
    }
    let t = if chat {
        &c["delta"]["content"]
    } else {
        &c["text"]
    };
    t.as_str().unwrap_or("").to_owned()
}

/// The value of an unlabelled metric in a `/metrics` text.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

/// Scrapes `/metrics` until `ok` holds (a bounded wait for the engine thread to
/// handle a cancel, not a timing assumption about generation).
pub fn wait_metrics(srv: &Server, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, text) = srv.get("/metrics");
        assert_eq!(status, 200);
        if ok(&text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
