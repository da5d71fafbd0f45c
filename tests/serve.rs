//! `dpo2d serve` end to end: the OpenAI wire format (whole and streamed
//! answers) checked with reqwest against a server on 127.0.0.1, its limits
//! and errors, batching of concurrent requests, 503 on a full queue, a
//! failed batch, the bearer key, Ctrl-C and SIGTERM with a request in flight
//! and a second Ctrl-C, a LoRA checkpoint as the model, `dpo2d annotate`
//! against it, and the official `openai` Python client.

mod common;

use dpo2d_serve::{Limits, Running, ServeOptions};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn tiny_model() -> (tempfile::TempDir, dpo2d_model::source::LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path());
    let lm = dpo2d_model::load(dir.path(), &Default::default()).unwrap();
    (dir, lm)
}

fn start(opts: ServeOptions) -> (tempfile::TempDir, Running) {
    let (dir, lm) = tiny_model();
    let opts = ServeOptions { port: 0, model_name: "tiny".into(), ..opts };
    (dir, dpo2d_serve::spawn(lm, opts).unwrap())
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{url}/chat/completions")).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn ask(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_in_the_openai_format_whole_and_streamed() {
    let (_d, srv) = start(ServeOptions::default());
    let url = srv.base_url();
    let http = reqwest::Client::new();
    let health: Value = http.get(format!("http://{}/health", srv.addr)).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let models: Value = http.get(format!("{url}/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");

    let (status, a) = post(&url, json!({"model": "tiny", "messages": ask("what is q1 ."), "temperature": 0, "max_tokens": 6})).await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["model"], "tiny");
    let choice = &a["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    let usage = &a["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 3);
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion_tokens <= 6);
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"].as_u64().unwrap() + completion_tokens);
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "length" && completion_tokens == 6 || finish == "stop", "{a}");

    // Greedy is repeatable; the streamed text is the same text.
    let (_, again) = post(&url, json!({"model": "tiny", "messages": ask("what is q1 ."), "temperature": 0, "max_tokens": 6})).await;
    assert_eq!(again["choices"][0]["message"]["content"], text.as_str());
    let body = json!({"model": "tiny", "messages": ask("what is q1 ."), "temperature": 0, "max_tokens": 6,
                      "stream": true, "stream_options": {"include_usage": true}});
    let r = http.post(format!("{url}/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text);
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], finish);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], completion_tokens);

    // n choices; a seed repeats a sampled answer.
    let sampled = json!({"model": "tiny", "messages": ask("what is q2 ."), "temperature": 1.0, "seed": 7, "n": 3, "max_tokens": 8});
    let (_, s1) = post(&url, sampled.clone()).await;
    let (_, s2) = post(&url, sampled).await;
    assert_eq!(s1["choices"].as_array().unwrap().len(), 3);
    assert_eq!(s1["choices"], s2["choices"]);
    assert_eq!(s1["choices"][2]["index"], 2);

    // A stop string is cut off, and the answer ends there: the first prompt
    // whose greedy answer has a word that is not at its start (the model is
    // fixed, so this is always the same prompt) is asked again with that
    // word as the stop string.
    let mut found = None;
    for q in 0..10 {
        let (_, a) =
            post(&url, json!({"model": "tiny", "messages": ask(&format!("what is q{q} .")), "temperature": 0, "max_tokens": 6})).await;
        let full = a["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        if let Some(stop) = full.split_whitespace().find(|w| full.find(*w).is_some_and(|at| at > 0)) {
            found = Some((q, full.clone(), stop.to_string()));
            break;
        }
    }
    let (q, full, stop) = found.expect("some greedy answer has two different words");
    let want = &full[..full.find(&stop).unwrap()];
    let body = json!({"model": "tiny", "messages": ask(&format!("what is q{q} .")), "temperature": 0, "max_tokens": 6, "stop": [stop]});
    let (_, cut) = post(&url, body.clone()).await;
    assert_eq!(cut["choices"][0]["message"]["content"], want, "{full:?} cut at {stop:?}");
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    // Streamed, the stop string never goes out either.
    let mut body = body;
    body["stream"] = json!(true);
    let text = http.post(format!("{url}/chat/completions")).json(&body).send().await.unwrap().text().await.unwrap();
    let data = sse_data(&text);
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, want);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "stop");
    srv.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_4xx_answers_and_the_server_survives() {
    let limits = Limits { max_body_bytes: 2000, max_tokens: 16, max_n: 2, max_prompt_tokens: 40, ..Limits::default() };
    let (_d, srv) = start(ServeOptions { limits, ..ServeOptions::default() });
    let url = srv.base_url();
    let http = reqwest::Client::new();
    let raw =
        |body: &'static str| http.post(format!("{url}/chat/completions")).header("content-type", "application/json").body(body).send();
    let r = raw("{not json").await.unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(e["error"]["message"].as_str().unwrap().contains("not a valid chat completion request"));
    assert_eq!(raw("{\"messages\": 3}").await.unwrap().status(), 400);
    assert_eq!(raw("[]").await.unwrap().status(), 400);
    let big = "x ".repeat(2000);
    let (s, e) = post(&url, json!({"messages": ask(&big)})).await;
    assert_eq!(s, 413, "{e}");
    let cases = [
        (json!({"messages": ask("q1"), "max_tokens": 17}), "max_tokens"),
        (json!({"messages": ask("q1"), "max_tokens": 0}), "max_tokens"),
        (json!({"messages": ask("q1"), "n": 3}), "n"),
        (json!({"messages": ask("q1"), "temperature": 3}), "temperature"),
        (json!({"messages": ask("q1"), "top_p": 0}), "top_p"),
        (json!({"messages": ask("q1"), "stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"messages": [{"role": "tool", "content": "x"}]}), "messages"),
        (json!({"messages": []}), "messages"),
        (json!({"messages": ask("q1"), "response_format": {"type": "json_schema", "json_schema": {}}}), "response_format"),
        (json!({"messages": ask(&"what is it . ".repeat(12))}), "messages"),
    ];
    for (body, param) in cases {
        let (s, e) = post(&url, body.clone()).await;
        assert_eq!(s, 400, "{body} -> {e}");
        assert_eq!(e["error"]["param"], param, "{body} -> {e}");
    }
    let (s, e) = post(&url, json!({"messages": ask(&"what is it . ".repeat(12))})).await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("context_length_exceeded")));
    let r = http.get(format!("{url}/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Still serving.
    let (s, a) = post(&url, json!({"messages": ask("q1"), "max_tokens": 3})).await;
    assert_eq!(s, 200, "{a}");
    srv.stop().unwrap();
}

/// The decoder's counters from `/health`: (batches, rows, pending).
async fn counters(addr: std::net::SocketAddr) -> (u64, u64, u64) {
    let h: Value = reqwest::get(format!("http://{addr}/health")).await.unwrap().json().await.unwrap();
    (h["batches"].as_u64().unwrap(), h["rows"].as_u64().unwrap(), h["pending"].as_u64().unwrap())
}

/// Waits until `pending` requests are queued or decoding (`/health`).
async fn until_pending(addr: std::net::SocketAddr, pending: u64) {
    for _ in 0..2000 {
        if counters(addr).await.2 == pending {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never {pending} request(s) pending");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_are_decoded_together() {
    let lone = |q: usize| json!({"messages": ask(&format!("what is q{q} .")), "temperature": 0, "max_tokens": 5});
    // Each answer alone: a server that decodes one row per batch.
    let one_at_a_time = Limits { max_n: 1, ..Limits::default() };
    let (_d, alone_srv) = start(ServeOptions { max_batch_rows: 1, limits: one_at_a_time.clone(), ..ServeOptions::default() });
    let mut alone = vec![];
    for q in 0..6 {
        alone.push(post(&alone_srv.base_url(), lone(q)).await.1["choices"][0]["message"]["content"].clone());
    }
    assert_eq!(counters(alone_srv.addr).await, (6, 6, 0));
    alone_srv.stop().unwrap();
    // All together: a batch waits (up to a minute) until it has its 6 rows,
    // so the six concurrent requests are one batch whatever the timing.
    let (_d, srv) =
        start(ServeOptions { max_batch_rows: 6, batch_wait: Duration::from_secs(60), limits: one_at_a_time, ..ServeOptions::default() });
    let url = srv.base_url();
    let together = futures_join((0..6).map(|q| {
        let url = url.clone();
        async move { post(&url, lone(q)).await.1["choices"][0]["message"]["content"].clone() }
    }))
    .await;
    assert_eq!(together, alone, "batched greedy answers differ from the answers alone");
    assert_eq!(counters(srv.addr).await, (1, 6, 0), "6 concurrent requests: one batch of 6 rows");
    srv.stop().unwrap();
}

/// The KV budget holds rows back: with room for two rows' prompts and
/// answers, six concurrent requests are admitted at most two at a time,
/// and each still gets its answer alone.
#[tokio::test(flavor = "multi_thread")]
async fn the_kv_budget_admits_only_the_rows_that_fit() {
    let lone = |q: usize| json!({"messages": ask(&format!("what is q{q} .")), "temperature": 0, "max_tokens": 5});
    let bytes_per_position = tiny_model().1.model.kv_bytes_per_position() as u64;
    let one_at_a_time = Limits { max_n: 1, ..Limits::default() };
    let (_d, alone_srv) = start(ServeOptions { max_batch_rows: 1, limits: one_at_a_time.clone(), ..ServeOptions::default() });
    let mut alone = vec![];
    let mut span = 0;
    for q in 0..6 {
        let a = post(&alone_srv.base_url(), lone(q)).await.1;
        span = span.max(a["usage"]["prompt_tokens"].as_u64().unwrap() + 5);
        alone.push(a["choices"][0]["message"]["content"].clone());
    }
    alone_srv.stop().unwrap();
    let kv_cache_bytes = 2 * span * bytes_per_position;
    let opts = ServeOptions {
        max_batch_rows: 6,
        batch_wait: Duration::from_secs(60),
        kv_cache_bytes,
        limits: one_at_a_time,
        ..ServeOptions::default()
    };
    let (_d, srv) = start(opts);
    let url = srv.base_url();
    let answers = futures_join((0..6).map(|q| {
        let url = url.clone();
        async move { post(&url, lone(q)).await.1["choices"][0]["message"]["content"].clone() }
    }))
    .await;
    assert_eq!(answers, alone);
    // Without the budget the six rows are one group; with it, groups of at
    // most two (one, when a row that ended early frees a place).
    let (groups, rows, pending) = counters(srv.addr).await;
    assert_eq!((rows, pending), (6, 0));
    assert!(groups >= 3, "two rows fit the budget, but the six came in {groups} group(s)");
    srv.stop().unwrap();
}

/// A full queue answers 503 with `Retry-After`, and the server goes on
/// serving once the queue has room again.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_503_with_retry_after() {
    // One request may be queued; it waits 5 s in the batch window, and a
    // second one sent meanwhile is refused. Had the second come only after
    // the first was answered (a machine stalled for 5 s), it is answered in
    // a batch of its own: then the try is repeated. Answered in the first
    // one's batch, it was let into a full queue: the test fails.
    let limits = Limits { max_queue: 1, ..Limits::default() };
    let (_d, srv) = start(ServeOptions { limits, batch_wait: Duration::from_secs(5), ..ServeOptions::default() });
    let url = srv.base_url();
    let body = json!({"messages": ask("what is q1 ."), "temperature": 0, "max_tokens": 3});
    let mut refused = false;
    for _ in 0..3 {
        let (batches_before, _, _) = counters(srv.addr).await;
        let first = tokio::spawn({
            let (url, body) = (url.clone(), body.clone());
            async move { post(&url, body).await }
        });
        until_pending(srv.addr, 1).await;
        let r = reqwest::Client::new().post(format!("{url}/chat/completions")).json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        let retry_after = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let e: Value = r.json().await.unwrap();
        let (first_status, a) = first.await.unwrap();
        assert_eq!(first_status, 200, "the queued request is answered: {a}");
        if status == 503 {
            assert_eq!(retry_after.as_deref(), Some("1"));
            assert_eq!(e["error"]["type"], "server_error", "{e}");
            refused = true;
            break;
        }
        assert_eq!(status, 200, "{e}");
        let (batches, _, _) = counters(srv.addr).await;
        assert_eq!(batches - batches_before, 2, "a request was let into a full queue (answered in the queued one's batch)");
    }
    assert!(refused, "never refused in three tries");
    let (status, a) = post(&url, body).await;
    assert_eq!(status, 200, "room again: {a}");
    assert_eq!(counters(srv.addr).await.2, 0);
    srv.stop().unwrap();
}

/// A batch that fails (here: a prompt word the tokenizer knows but the model
/// cannot embed) fails its own requests with a server error, whole or
/// streamed, and the server answers the next requests.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_batch_fails_its_requests_and_the_server_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model_from(dir.path(), &<dpo2d_model::test_support::TinyModel as common::TinyModelExt>::e2e(), &["zz"]);
    let lm = dpo2d_model::load(dir.path(), &Default::default()).unwrap();
    let srv = dpo2d_serve::spawn(lm, ServeOptions { port: 0, ..ServeOptions::default() }).unwrap();
    let url = srv.base_url();
    let good = json!({"messages": ask("what is q1 ."), "temperature": 0, "max_tokens": 3});
    let bad = json!({"messages": ask("what is zz ."), "temperature": 0, "max_tokens": 3});
    let (s, a) = post(&url, good.clone()).await;
    assert_eq!(s, 200, "{a}");
    let (s, e) = post(&url, bad.clone()).await;
    assert_eq!(s, 500, "{e}");
    assert_eq!(e["error"]["type"], "server_error");
    assert!(e["error"]["message"].as_str().unwrap().contains("generation failed"), "{e}");
    let (s, again) = post(&url, good.clone()).await;
    assert_eq!((s, &again["choices"][0]["message"]["content"]), (200, &a["choices"][0]["message"]["content"]), "{again}");
    // Streamed: the stream carries the error and ends.
    let mut streamed = bad;
    streamed["stream"] = json!(true);
    let text = reqwest::Client::new().post(format!("{url}/chat/completions")).json(&streamed).send().await.unwrap().text().await.unwrap();
    let data = sse_data(&text);
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert!(last["error"]["message"].as_str().unwrap().contains("generation failed"), "{text}");
    let (s, _) = post(&url, good).await;
    assert_eq!(s, 200);
    let (batches, _, pending) = counters(srv.addr).await;
    assert_eq!((batches, pending), (5, 0));
    srv.stop().unwrap();
}

async fn futures_join<F: std::future::Future<Output = Value> + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<Value> {
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = vec![];
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_is_required_when_configured() {
    let (_d, srv) = start(ServeOptions { api_key: Some("sk-serve-test".into()), ..ServeOptions::default() });
    let url = srv.base_url();
    let http = reqwest::Client::new();
    let body = json!({"messages": ask("q1"), "max_tokens": 2});
    let r = http.post(format!("{url}/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key");
    let r = http.post(format!("{url}/chat/completions")).bearer_auth("sk-wrong").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.post(format!("{url}/chat/completions")).bearer_auth("sk-serve-test").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The health check stays open for load balancers.
    assert_eq!(http.get(format!("http://{}/health", srv.addr)).send().await.unwrap().status(), 200);
    srv.stop().unwrap();
}

/// `dpo2d serve` as a process: its base URL, and its stderr lines as they come.
struct Served {
    child: Child,
    url: String,
    addr: std::net::SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
}

fn serve_process(model: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
        .args(extra)
        .envs(envs.iter().copied())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Keep draining stderr so the server never blocks on a full pipe.
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut s = Served { child, url: String::new(), addr: ([127, 0, 0, 1], 0).into(), lines, log: vec![] };
    let line = s.wait_for("serving ").expect("serve exited before listening");
    s.url = line.split(" at ").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
    s.addr = s.url.trim_start_matches("http://").trim_end_matches("/v1").parse().unwrap();
    s
}

/// A test that fails before the server exits leaves no server behind.
impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Served {
    /// Reads the log until a line that holds `needle`; `None` when the log ends first.
    fn wait_for(&mut self, needle: &str) -> Option<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(300)) {
            self.log.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    }

    /// The whole log (call after the process exited).
    fn log(&mut self) -> String {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.log.push(line);
        }
        self.log.join("\n")
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    fn interrupt(&self) {
        self.signal("-INT");
    }

    /// Waits for the process to exit; one that does not exit within five
    /// minutes is killed and fails the test (instead of hanging it).
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        for _ in 0..3000 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("the server did not exit:\n{}", self.log());
    }

    /// Waits until `n` requests are queued or decoding.
    fn wait_pending(&self, n: u64) {
        tokio::runtime::Runtime::new().unwrap().block_on(until_pending(self.addr, n));
    }

    /// A request on a thread of its own: its status and body, or the error
    /// of a connection that broke.
    fn request(&self, body: Value) -> std::thread::JoinHandle<Result<(u16, Value), String>> {
        let url = format!("{}/chat/completions", self.url);
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async move {
                let http = reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
                let r = http.post(url).json(&body).send().await.map_err(|e| e.to_string())?;
                let status = r.status().as_u16();
                Ok((status, r.json().await.map_err(|e| e.to_string())?))
            })
        })
    }
}

/// Ctrl-C (SIGINT) or SIGTERM while a request waits (5 s) in the batch
/// window: the server says it is stopping, answers it, and exits 0.
fn a_signal_finishes_the_request_in_flight(sig: &str) {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path());
    let mut served = serve_process(dir.path(), &["--batch-wait-ms", "5000"], &[]);
    let req = served.request(json!({"messages": ask("what is q3 ."), "max_tokens": 200, "temperature": 0}));
    served.wait_pending(1);
    served.signal(sig);
    let (status, answer) = req.join().unwrap().expect("the request in flight is answered");
    assert_eq!(status, 200, "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let exit = served.wait_exit();
    assert!(exit.success(), "{sig}: {exit}");
    let log = served.log();
    // The signal was taken while the request was in flight: the server
    // said it was stopping before it answered.
    let (stopping, answered) = (log.find("stopping: finishing the requests in flight"), log.find("POST /v1/chat/completions 200"));
    assert!(stopping.is_some() && answered.is_some() && stopping < answered, "{log}");
    // No prompt text in the log without -v.
    assert!(!log.contains("q3"), "{log}");
}

#[test]
fn ctrl_c_finishes_the_request_in_flight() {
    a_signal_finishes_the_request_in_flight("-INT");
}

#[test]
fn sigterm_finishes_the_request_in_flight() {
    a_signal_finishes_the_request_in_flight("-TERM");
}

/// A second Ctrl-C quits at once (exit 130) instead of waiting for the
/// request in flight, which here would wait a minute in the batch window.
#[test]
fn a_second_ctrl_c_quits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path());
    let mut served = serve_process(dir.path(), &["--batch-wait-ms", "60000"], &[]);
    let req = served.request(json!({"messages": ask("what is q3 ."), "max_tokens": 20, "temperature": 0}));
    served.wait_pending(1);
    served.interrupt();
    served.wait_for("stopping: finishing the requests in flight").expect("the first Ctrl-C is acknowledged");
    // The second Ctrl-C (sent until the process is gone: one that lands
    // before the second handler listens is not counted).
    let mut exit = None;
    for _ in 0..100 {
        served.interrupt();
        std::thread::sleep(Duration::from_millis(100));
        if let Some(e) = served.child.try_wait().unwrap() {
            exit = Some(e);
            break;
        }
    }
    let exit = match exit {
        Some(e) => e,
        None => served.wait_exit(),
    };
    assert_eq!(exit.code(), Some(130), "{exit}: {}", served.log());
    assert!(req.join().unwrap().is_err(), "the request in flight was not answered");
}

#[test]
fn serves_a_lora_checkpoint() {
    use dpo2d_model::llama::{CausalLM, LoadOptions};
    use dpo2d_model::lora::{LoraConfig, LoraTarget};
    let base = tempfile::tempdir().unwrap();
    common::write_tiny_model(base.path());
    let lcfg = LoraConfig { r: 2, alpha: 4.0, dropout: 0.0, targets: vec![LoraTarget::Q, LoraTarget::V], seed: 5 };
    let m = CausalLM::load(base.path(), &LoadOptions { lora: Some(lcfg), ..LoadOptions::default() }).unwrap();
    for (n, v) in m.trainable_vars() {
        if n.contains("lora_B") {
            v.set(&(v.ones_like().unwrap() * 0.3).unwrap()).unwrap();
        }
    }
    let ad = tempfile::tempdir().unwrap();
    dpo2d_model::save::save_lora_adapter(&m, ad.path(), base.path().to_str().unwrap()).unwrap();
    let loaded = dpo2d_model::load(ad.path(), &LoadOptions::default()).unwrap();
    let x = candle_core::Tensor::new(&[[3u32, 4, 5, 6]], &candle_core::Device::Cpu).unwrap();
    let layout = dpo2d_model::llama::AttentionLayout::causal(1, 4);
    let want = m.logits(&m.forward(&x, &layout).unwrap()).unwrap();
    let got = loaded.model.logits(&loaded.model.forward(&x, &layout).unwrap()).unwrap();
    let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "adapter loaded through `load` differs by {diff}");
    let srv = dpo2d_serve::spawn(loaded, ServeOptions { port: 0, ..ServeOptions::default() }).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (s, a) = rt.block_on(post(&srv.base_url(), json!({"messages": ask("q1"), "max_tokens": 3})));
    assert_eq!(s, 200, "{a}");
    srv.stop().unwrap();
}

#[test]
fn annotate_runs_against_serve() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path());
    // The judge's prompts are longer than the tiny model's 256 positions.
    let cfg_path = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = json!(2048);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut served =
        serve_process(dir.path(), &["--api-key-env", "DPO2D_TEST_SERVE_KEY"], &[("DPO2D_TEST_SERVE_KEY", "sk-annotate-serve")]);
    let url = served.url.clone();
    let pairs = dir.path().join("pairs.jsonl");
    common::write_pairs(&pairs, 0..2, false);
    let out = dir.path().join("pairs.2d.jsonl");
    let run = Command::new(env!("CARGO_BIN_EXE_dpo2d"))
        .args(["annotate", pairs.to_str().unwrap(), "-o", out.to_str().unwrap(), "--base-url", &url, "--model", "tiny"])
        .args(["--api-key-env", "DPO2D_TEST_SERVE_KEY", "--max-retries", "0", "--no-progress"])
        .env("DPO2D_TEST_SERVE_KEY", "sk-annotate-serve")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // A random model is a useless judge, but every request was answered:
    // whatever failed, failed on the answer's content, not on the exchange.
    assert!(stderr.contains("pairs: 2 in"), "{stderr}");
    let sent: u64 =
        stderr.split("requests: ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect("requests: N sent");
    assert!(sent > 0, "{stderr}");
    // Failed attempts ("failed attempts: 3 rejected, 1 timeout"): only the
    // refusal of the structured-output request, none on the exchange.
    if let Some(line) = stderr.lines().find_map(|l| l.strip_prefix("failed attempts: ")) {
        for entry in line.split(", ") {
            let (n, reason) = entry.split_once(' ').unwrap();
            assert!(n.parse::<u64>().is_ok() && reason == "rejected", "a failed exchange ({entry}):\n{stderr}");
        }
    }
    served.interrupt();
    assert!(served.wait_exit().success());
    let log = served.log();
    // The structured-output request is refused, the free-text ones answered.
    assert!(log.contains("POST /v1/chat/completions 400"), "{log}");
    assert!(log.contains("POST /v1/chat/completions 200"), "{log}");
}

/// The official `openai` Python package (installed with pip into the
/// target directory on first use) as the client, whole and streamed; with
/// `response_format` json_schema and json_object, and log-probs.
#[test]
fn the_openai_python_client_talks_to_serve() {
    let site = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-openai");
    if !site.join("openai").is_dir() {
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", site.to_str().unwrap(), "openai>=1.40"])
            .status()
            .expect("python3 is needed for this test");
        assert!(st.success(), "pip could not install the openai package");
    }
    let dir = tempfile::tempdir().unwrap();
    common::write_tiny_model(dir.path());
    let mut served = serve_process(dir.path(), &["--served-model-name", "tiny-served"], &[]);
    let url = served.url.clone();
    let script = r#"
import sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="unused")
assert [m.id for m in c.models.list().data] == ["tiny-served"]
r = c.chat.completions.create(model="tiny-served", messages=[{"role": "user", "content": "what is q1 ."}], max_tokens=5, temperature=0)
whole = r.choices[0].message.content
assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length"), r
parts = []
for chunk in c.chat.completions.create(model="tiny-served", messages=[{"role": "user", "content": "what is q1 ."}], max_tokens=5, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == whole, (parts, whole)
try:
    c.chat.completions.create(model="tiny-served", messages=[{"role": "user", "content": "q"}], max_tokens=10**9)
    raise SystemExit("no error for max_tokens=1e9")
except Exception as e:
    assert "max_tokens" in str(e), e
print("ok", repr(whole))
"#;
    let out = Command::new("python3").args(["-c", script, &url]).env("PYTHONPATH", &site).output().unwrap();
    served.interrupt();
    served.wait_exit();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok"));

    // Structured outputs and log-probs through the same client, whole and streamed.
    let bytes = tempfile::tempdir().unwrap();
    dpo2d_model::test_support::TinyModel::byte_level().write_byte_level(bytes.path());
    let mut served = serve_process(bytes.path(), &["--served-model-name", "tiny-bytes"], &[]);
    let script = r#"
import json, sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key="unused")
schema = {"type": "object", "properties": {"verdict": {"type": "string", "enum": ["A", "B", "C"]}}, "required": ["verdict"], "additionalProperties": False}
fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
msgs = [{"role": "user", "content": "A or B?"}]
for seed in range(4):
    r = c.chat.completions.create(model="tiny-bytes", messages=msgs, response_format=fmt, temperature=1.0, seed=seed, max_tokens=200, logprobs=True, top_logprobs=2)
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch
    assert json.loads(ch.message.content)["verdict"] in ("A", "B", "C"), ch.message.content
    assert "".join(t.token for t in ch.logprobs.content) == ch.message.content
    assert all(len(t.top_logprobs) <= 2 and t.logprob <= 0 for t in ch.logprobs.content)
    text = "".join(k.choices[0].delta.content or "" for k in c.chat.completions.create(model="tiny-bytes", messages=msgs, response_format=fmt, temperature=1.0, seed=seed, max_tokens=200, stream=True) if k.choices)
    assert text == ch.message.content, (text, ch.message.content)
obj = c.chat.completions.create(model="tiny-bytes", messages=msgs, response_format={"type": "json_object"}, temperature=0, max_tokens=1500)
if obj.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
print("ok")
"#;
    let out = Command::new("python3").args(["-c", script, &served.url]).env("PYTHONPATH", &site).output().unwrap();
    served.interrupt();
    served.wait_exit();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// A server over a tiny random model with a byte-level tokenizer: it can
/// write any text, so every grammar can be followed.
fn start_byte_level(opts: ServeOptions) -> (tempfile::TempDir, Running) {
    let dir = tempfile::tempdir().unwrap();
    dpo2d_model::test_support::TinyModel::byte_level().write_byte_level(dir.path());
    let lm = dpo2d_model::load(dir.path(), &Default::default()).unwrap();
    let opts = ServeOptions { port: 0, model_name: "tiny".into(), ..opts };
    (dir, dpo2d_serve::spawn(lm, opts).unwrap())
}

/// Checks `v` against the part of JSON Schema the judges' schemas use
/// (type, enum, properties, required, additionalProperties: false, items,
/// minItems, maxItems); `Err` says where it does not fit.
fn fits(v: &Value, s: &Value, at: &str) -> Result<(), String> {
    if let Some(options) = s.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            return Err(format!("{at}: {v} is not one of {options:?}"));
        }
    }
    let ty = s.get("type").and_then(Value::as_str).unwrap_or("");
    let ok = match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: {v} is not of type {ty}"));
    }
    if let (Some(obj), Some(props)) = (v.as_object(), s.get("properties").and_then(Value::as_object)) {
        for req in s.get("required").and_then(Value::as_array).into_iter().flatten() {
            if !obj.contains_key(req.as_str().unwrap()) {
                return Err(format!("{at}: {req} is missing"));
            }
        }
        for (k, x) in obj {
            match props.get(k) {
                Some(ps) => fits(x, ps, &format!("{at}.{k}"))?,
                None if s.get("additionalProperties") == Some(&json!(false)) => return Err(format!("{at}: {k} is not allowed")),
                None => {}
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if s.get("minItems").and_then(Value::as_u64).is_some_and(|m| n < m)
            || s.get("maxItems").and_then(Value::as_u64).is_some_and(|m| n > m)
        {
            return Err(format!("{at}: {n} items"));
        }
        if let Some(is) = s.get("items") {
            for (i, x) in items.iter().enumerate() {
                fits(x, is, &format!("{at}[{i}]"))?;
            }
        }
    }
    Ok(())
}

/// The schemas the judges ask for: annotate's segment ratings (a safety
/// one: 0 or 4), eval's grade, both verdicts and the aspect ratings, and
/// `json_object`.
fn judge_formats() -> Vec<Value> {
    use dpo2d_annotate::prompt::{ResponseFormatSpec, Tagging};
    use dpo2d_annotate::Aspect;
    use dpo2d_eval::judge;
    use dpo2d_eval::sets::Grading;
    let spec = |f: ResponseFormatSpec| serde_json::to_value(f).unwrap();
    vec![
        spec(ResponseFormatSpec::for_answer(&Tagging::new(2, 3), Aspect::Safety)),
        spec(ResponseFormatSpec::for_answer(&Tagging::new(1, 1), Aspect::Clarity)),
        spec(judge::grade_format()),
        spec(judge::verdict_format(Grading::PairwiseQuick)),
        spec(judge::verdict_format(Grading::PairwiseReasoned)),
        spec(judge::aspects_format()),
        json!({"type": "json_object"}),
    ]
}

/// Structured outputs: whatever the temperature and seed, every answer that
/// ends (rather than running into `max_tokens`) is JSON that fits the
/// schema, whole and streamed; a good share end.
#[tokio::test(flavor = "multi_thread")]
async fn structured_outputs_always_fit_the_judges_schemas() {
    let (_d, srv) = start_byte_level(ServeOptions::default());
    let url = srv.base_url();
    let cases: u64 = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(21);
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let formats = judge_formats();
    let (mut ended, mut all) = (0, 0);
    for case in 0..cases {
        let format = &formats[case as usize % formats.len()];
        let schema = format.pointer("/json_schema/schema").cloned().unwrap_or(json!({"type": "object"}));
        let temperature = (next() % 150) as f64 / 100.0;
        let body = json!({"messages": ask("rate this"), "response_format": format, "temperature": temperature,
                          "seed": next() % 1000, "max_tokens": 1500, "n": 2, "stream": case % 2 == 1});
        let texts: Vec<(String, String)> = if case % 2 == 1 {
            let text =
                reqwest::Client::new().post(format!("{url}/chat/completions")).json(&body).send().await.unwrap().text().await.unwrap();
            let mut parts = vec![String::new(); 2];
            let mut finish = vec![String::new(); 2];
            for d in sse_data(&text).iter().filter(|d| *d != "[DONE]") {
                let v: Value = serde_json::from_str(d).unwrap();
                let c = &v["choices"][0];
                let i = c["index"].as_u64().unwrap() as usize;
                parts[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
                if let Some(f) = c["finish_reason"].as_str() {
                    finish[i] = f.to_string();
                }
            }
            parts.into_iter().zip(finish).collect()
        } else {
            let (status, a) = post(&url, body).await;
            assert_eq!(status, 200, "{a}");
            a["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["message"]["content"].as_str().unwrap().to_string(), c["finish_reason"].as_str().unwrap().to_string()))
                .collect()
        };
        for (text, finish) in texts {
            all += 1;
            if finish == "length" {
                continue;
            }
            ended += 1;
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("case {case} (t={temperature}): not JSON ({e}): {text:?}"));
            fits(&v, &schema, "$").unwrap_or_else(|e| panic!("case {case} (t={temperature}): {e}: {text}"));
        }
    }
    // A random model writes long strings (about one closing quote in 250 tokens): many run out.
    assert!(ended * 3 >= all, "only {ended} of {all} answers ended within 1500 tokens");
    srv.stop().unwrap();
}

/// Bad schemas, unknown formats and fields this server cannot honour get a
/// 400 that names them; a word-level tokenizer (no byte vocabulary) refuses
/// structured outputs in words.
#[tokio::test(flavor = "multi_thread")]
async fn bad_schemas_and_unsupported_fields_get_400() {
    let (_d, srv) = start_byte_level(ServeOptions::default());
    let url = srv.base_url();
    let schema = |s: Value| json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}});
    for (extra, param) in [
        (json!({"response_format": schema(json!({"type": "object", "properties": {"a": {"type": "no-such-type"}}}))}), "response_format"),
        (
            json!({"response_format": schema(json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}))}),
            "response_format",
        ),
        (json!({"response_format": {"type": "json_schema"}}), "response_format"),
        (json!({"response_format": {"type": "yaml"}}), "response_format"),
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        (json!({"logit_bias": {"5": 3}}), "logit_bias"),
    ] {
        let mut body = json!({"messages": ask("hi"), "max_tokens": 3});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, e) = post(&url, body.clone()).await;
        assert_eq!((status, e["error"]["param"].as_str()), (400, Some(param)), "{body} -> {e}");
    }
    srv.stop().unwrap();
    let (_d, words) = start(ServeOptions::default());
    let (status, e) = post(&words.base_url(), json!({"messages": ask("hi"), "response_format": {"type": "json_object"}})).await;
    assert_eq!(status, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("does not support constrained decoding"), "{e}");
    words.stop().unwrap();
}

/// Log-probabilities in OpenAI's shape: one entry per completion token with
/// its text, bytes and `top_logprobs` (most likely first, the greedy choice
/// at the top), whole and streamed alike.
#[tokio::test(flavor = "multi_thread")]
async fn logprobs_come_in_the_openai_shape() {
    let (_d, srv) = start_byte_level(ServeOptions::default());
    let url = srv.base_url();
    let body = json!({"messages": ask("hi"), "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let (status, a) = post(&url, body.clone()).await;
    assert_eq!(status, 200, "{a}");
    let content = a["choices"][0]["logprobs"]["content"].as_array().unwrap().clone();
    assert_eq!(content.len() as u64, a["usage"]["completion_tokens"].as_u64().unwrap(), "{a}");
    let mut text = String::new();
    for e in &content {
        let (token, lp) = (e["token"].as_str().unwrap(), e["logprob"].as_f64().unwrap());
        assert!(lp <= 0.0);
        assert_eq!(e["bytes"], json!(token.as_bytes()));
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{lps:?}");
        assert_eq!((top[0]["token"].as_str().unwrap(), lps[0]), (token, lp), "greedy takes the most likely token");
        text.push_str(token);
    }
    assert_eq!(text, a["choices"][0]["message"]["content"].as_str().unwrap());
    // Without logprobs the field is null.
    let (_, plain) = post(&url, json!({"messages": ask("hi"), "max_tokens": 2})).await;
    assert!(plain["choices"][0]["logprobs"].is_null(), "{plain}");
    // Streamed: the chunks' entries are the same tokens.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let sse = reqwest::Client::new().post(format!("{url}/chat/completions")).json(&streamed).send().await.unwrap().text().await.unwrap();
    let mut entries = vec![];
    for d in sse_data(&sse).iter().filter(|d| *d != "[DONE]") {
        let v: Value = serde_json::from_str(d).unwrap();
        if let Some(c) = v["choices"][0]["logprobs"]["content"].as_array() {
            entries.extend(c.iter().cloned());
        }
    }
    assert_eq!(entries, content);
    srv.stop().unwrap();
}

/// Continuous batching: a short request that arrives while a long one is
/// decoding joins it at a step and is answered while the long one is still
/// decoding (the server counts it pending), which then ends as it would.
#[tokio::test(flavor = "multi_thread")]
async fn a_short_request_arriving_during_a_long_one_finishes_first() {
    let (_d, srv) = start_byte_level(ServeOptions::default());
    let url = srv.base_url();
    // A grammar that forces at least 1000 characters: a long answer whatever the model.
    let long_format = json!({"type": "json_schema", "json_schema": {"name": "long", "schema": {"type": "string", "minLength": 1000}}});
    let long = json!({"messages": ask("hi"), "max_tokens": 1500, "stream": true, "response_format": long_format, "temperature": 0});
    let mut resp = reqwest::Client::new().post(format!("{url}/chat/completions")).json(&long).send().await.unwrap();
    // Wait for the long answer's first piece of text, then read the rest on the side.
    let mut buf = String::new();
    while !sse_data(&buf).iter().any(|d| d.contains("\"content\":\"") && !d.contains("\"content\":\"\"")) {
        buf.push_str(&String::from_utf8_lossy(&resp.chunk().await.unwrap().expect("the long stream ended early")));
    }
    let rest = tokio::spawn(async move {
        while let Some(c) = resp.chunk().await.unwrap() {
            buf.push_str(&String::from_utf8_lossy(&c));
        }
        buf
    });
    let (status, short) = post(&url, json!({"messages": ask("q"), "max_tokens": 3, "temperature": 0})).await;
    assert_eq!(status, 200, "{short}");
    let (_, _, pending) = counters(srv.addr).await;
    assert_eq!(pending, 1, "the long request was no longer decoding when the short one was answered");
    let data = sse_data(&rest.await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    srv.stop().unwrap();
}
