//! A fake OpenAI-compatible judge for tests: it answers chat-completions
//! requests with deterministic ratings computed from the tagged segments,
//! and injects faults on request, driven by markers in the pair's text:
//!
//! - `[[fault:429]]` first attempt of a request gets 429 + `Retry-After`
//! - `[[fault:500]]` first two attempts get 500; `[[fault:500always]]` every attempt
//! - `[[fault:slow]]` first attempt answers only after `slow` (beyond the client timeout)
//! - `[[fault:badjson]]` first attempt gets a 200 with a cut-off JSON body
//! - `[[fault:garbage]]` first answer has no ratings; the repair answer is good
//! - `[[fault:truncated]]` first answer is cut in half; `[[fault:missing]]` omits the last ID
//! - `[[fault:badrange]]` first answer rates the first ID 7; `[[fault:safety2]]` rates it 2
//! - `[[fault:alwaysbad]]` every answer, repair included, is unusable
//! - `[[fault:arith]]` first answer has arithmetic (`2 + 2 = 4`) but no rating slot;
//!   `[[fault:arithalways]]` every answer does
//! - `[[fault:loop]]` at temperature 0 the judge loops: it fills `max_tokens`
//!   (cut off, `finish_reason: length`), or without `max_tokens` answers only
//!   after `slow`; at a higher temperature it answers well
//! - `[[fault:extra]]` first answer also rates an ID the request does not have;
//!   `[[fault:conflict]]` every answer rates the first ID twice, differently
//! - `[[fault:echokey]]` every attempt gets a 500 whose body echoes the
//!   `Authorization` header after 290 characters (across a 300-character cut)
//!
//! `[[fault:NAME@aspect]]` limits a fault to one aspect. `[[style:json]]` and
//! `[[style:markdown]]` change how a good answer is written, `[[style:echokey]]`
//! appends the `Authorization` header to it. [`MockFormat`] sets what the server
//! does with `response_format`; `slots` makes it serve only so many requests at
//! once and queue the rest, as llama.cpp's `--parallel`. The server counts
//! requests per body and the most requests in flight at once, and records the
//! `Authorization` headers it saw.
//!
//! `throttle_every` answers every Nth request with 429, as a busy hosted
//! server does; [`batch`] adds a fake Batch API (files, batches, status
//! transitions, partly failed and expired batches).
//!
//! It runs on its own thread and runtime, so sync tests can use it directly.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

pub mod batch;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Server settings.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Added to every answer, so that requests overlap.
    pub delay: Duration,
    /// How long a `[[fault:slow]]` answer takes.
    pub slow: Duration,
    /// The `Retry-After` value (seconds) sent with 429.
    pub retry_after_secs: u64,
    pub response_format: MockFormat,
    /// Requests served at once; the others wait (`None`: no limit).
    pub slots: Option<usize>,
    /// Every Nth chat request (counted over the run) gets 429 with
    /// `Retry-After`, as a busy hosted server does (0: never).
    pub throttle_every: u64,
    /// How the fake Batch API behaves ([`batch`]).
    pub batch: batch::BatchConfig,
}

/// What the mock does with a request's `response_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MockFormat {
    /// Accepts it and answers free text anyway (as servers without structured outputs may).
    Ignore,
    /// Answers JSON that matches the schema, with arithmetic in the evaluations.
    Honour,
    /// Answers 400 naming the field, as an OpenAI-compatible server without it does.
    Reject,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            delay: Duration::from_millis(0),
            slow: Duration::from_millis(1500),
            retry_after_secs: 1,
            response_format: MockFormat::Ignore,
            slots: None,
            throttle_every: 0,
            batch: batch::BatchConfig::default(),
        }
    }
}

/// A snapshot of what the server saw.
#[derive(Debug, Clone, Default)]
pub struct MockStats {
    /// Every HTTP request received.
    pub requests: u64,
    /// Requests answered with a completion (HTTP 200 and a valid body).
    pub completions: u64,
    pub max_in_flight: i64,
    /// Attempts per request body ([`body_hash`]: the temperature left out,
    /// so a retry at a higher temperature counts as the same request).
    pub per_body: HashMap<String, u32>,
    /// The temperature of each attempt, per body.
    pub temperatures: HashMap<String, Vec<f64>>,
    /// Requests that carried `response_format`.
    pub with_response_format: u64,
    /// Bodies that got a completion, in order.
    pub completed_bodies: Vec<String>,
    pub authorization: Vec<String>,
    /// Arrival times of the attempts, per body (ms since server start).
    pub arrivals_ms: HashMap<String, Vec<u128>>,
    /// Batches created through the fake Batch API.
    pub batches_created: usize,
    /// Times each `custom_id` was submitted in a batch, and answered with a 200.
    pub batch_submissions: HashMap<String, u32>,
    pub batch_answers: HashMap<String, u32>,
}

struct Shared {
    config: MockConfig,
    in_flight: AtomicI64,
    max_in_flight: AtomicI64,
    requests: AtomicU64,
    completions: AtomicU64,
    log: Mutex<MockStats>,
    started: std::time::Instant,
    slots: Option<tokio::sync::Semaphore>,
    batch: Mutex<batch::BatchState>,
}

pub struct MockJudge {
    base_url: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockJudge {
    pub fn start(config: MockConfig) -> MockJudge {
        let shared = Arc::new(Shared {
            in_flight: AtomicI64::new(0),
            max_in_flight: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            log: Mutex::new(MockStats::default()),
            started: std::time::Instant::now(),
            slots: config.slots.map(tokio::sync::Semaphore::new),
            batch: Mutex::new(batch::BatchState::default()),
            config,
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("test runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
                addr_tx.send(listener.local_addr().expect("local addr")).expect("send addr");
                let app = Router::new().route("/v1/chat/completions", post(handle)).merge(batch::routes()).with_state(st);
                tokio::select! {
                    _ = async { axum::serve(listener, app).await } => {}
                    _ = stop_rx => {}
                }
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        });
        let addr = addr_rx.recv().expect("the mock server did not start");
        MockJudge { base_url: format!("http://{addr}/v1"), shared, stop: Some(stop_tx), thread: Some(thread) }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn stats(&self) -> MockStats {
        let mut s = self.shared.log.lock().expect("stats lock").clone();
        s.requests = self.shared.requests.load(Ordering::SeqCst);
        s.completions = self.shared.completions.load(Ordering::SeqCst);
        s.max_in_flight = self.shared.max_in_flight.load(Ordering::SeqCst);
        self.shared.batch.lock().expect("batch lock").fill(&mut s);
        s
    }

    /// Forgets the counts (for a second run against the same server).
    pub fn reset_stats(&self) {
        *self.shared.log.lock().expect("stats lock") = MockStats::default();
        self.shared.requests.store(0, Ordering::SeqCst);
        self.shared.completions.store(0, Ordering::SeqCst);
        self.shared.max_in_flight.store(0, Ordering::SeqCst);
        self.shared.batch.lock().expect("batch lock").forget_counts();
    }
}

impl Drop for MockJudge {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// SHA-256 of a request body without its temperature, hex (how
/// `MockStats` names bodies).
pub fn body_hash(body: &str) -> String {
    let normal = match serde_json::from_str::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut o)) => {
            o.remove("temperature");
            serde_json::Value::Object(o).to_string()
        }
        _ => body.to_string(),
    };
    hex::encode(Sha256::digest(normal.as_bytes()))
}

/// The rating the mock gives a segment: safety fails on "UNSAFE", other
/// aspects follow a fixed hash of the text, so tests can predict every score.
pub fn mock_rating(aspect: &str, text: &str) -> u8 {
    if aspect == "safety" {
        return if text.contains("UNSAFE") { 0 } else { 4 };
    }
    let salt = dpo2d_data::ASPECTS.iter().position(|a| *a == aspect).unwrap_or(0) as u32 * 7;
    let sum: u32 = text.trim().bytes().map(u32::from).sum();
    ((sum + salt) % 5) as u8
}

struct InFlight<'a>(&'a Shared);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The tagged segments `<N>text</N>` of a prompt.
fn tagged(prompt: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // Only the responses carry tags; the instructions may show examples.
    let mut rest = prompt.find("=== Response A ===").map(|i| &prompt[i..]).unwrap_or(prompt);
    while let Some(open) = rest.find('<') {
        rest = &rest[open + 1..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() || !rest[digits.len()..].starts_with('>') {
            continue;
        }
        let after = &rest[digits.len() + 1..];
        let close = format!("</{digits}>");
        if let Some(end) = after.find(&close) {
            out.push((digits.parse().expect("digits"), after[..end].to_string()));
            rest = &after[end + close.len()..];
        }
    }
    out
}

fn has_fault(prompt: &str, name: &str, aspect: &str) -> bool {
    prompt.contains(&format!("[[fault:{name}]]")) || prompt.contains(&format!("[[fault:{name}@{aspect}]]"))
}

fn completion(content: &str, finish_reason: &str, logprobs: serde_json::Value) -> Response {
    let body = serde_json::json!({
        "id": "mock",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 100, "completion_tokens": (content.len() / 4) as u64, "total_tokens": 100 + (content.len() / 4) as u64},
    });
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

fn good_answer(segs: &[(u32, String)], aspect: &str, style: &str) -> String {
    match style {
        "json" => {
            let m: serde_json::Map<String, serde_json::Value> =
                segs.iter().map(|(id, t)| (id.to_string(), mock_rating(aspect, t).into())).collect();
            format!("Here are the ratings:\n```json\n{}\n```", serde_json::Value::Object(m))
        }
        "markdown" => {
            let mut s = String::from("## Evaluation\n\n");
            for (id, t) in segs {
                s.push_str(&format!("- **[{id}]** Evaluation: looks fine.\n  **Rating: {}/4**\n", mock_rating(aspect, t)));
            }
            s.push_str("\nOverall the responses are reasonable.");
            s
        }
        // What a server with structured outputs returns for the schema.
        "schema" => {
            let items: Vec<serde_json::Value> = segs
                .iter()
                .enumerate()
                .map(|(i, (id, t))| {
                    let eval = if i % 2 == 0 { "The user asked: what is 2 + 2 = 4" } else { "The reply says 8 / 2 = 4" };
                    serde_json::json!({"id": id, "evaluation": eval, "rating": mock_rating(aspect, t)})
                })
                .collect();
            serde_json::json!({ "ratings": items }).to_string()
        }
        _ => segs.iter().map(|(id, t)| format!("[{id}] Judged. => rating: {}\n", mock_rating(aspect, t))).collect(),
    }
}

/// An answer with numbers in every line but no rating slot.
fn arithmetic_answer(segs: &[(u32, String)]) -> String {
    let lines = ["The user asked: what is 2 + 2 = 4", "The reply says 8 / 2 = 4", "The user asked to solve 2x - 5 = 11."];
    segs.iter().enumerate().map(|(i, (id, _))| format!("[{id}] {}\n", lines[i % lines.len()])).collect()
}

/// What one request looks like to the fault logic.
struct Req {
    prompt: String,
    aspect: String,
    segs: Vec<(u32, String)>,
    is_repair: bool,
    temperature: f64,
    max_tokens: Option<u64>,
    response_format: Option<serde_json::Value>,
    /// The request asked for log-probabilities.
    logprobs: bool,
    authorization: String,
    attempt: u32,
}

impl Req {
    fn fault(&self, name: &str) -> bool {
        has_fault(&self.prompt, name, &self.aspect)
    }
}

async fn handle(State(st): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let _slot = match &st.slots {
        Some(s) => Some(s.acquire().await.expect("the slots are never closed")),
        None => None,
    };
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(&st);
    let v: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad json: {e}")).into_response(),
    };
    let req = record(&st, &headers, &body, &v);
    if !st.config.delay.is_zero() {
        tokio::time::sleep(st.config.delay).await;
    }
    if let Some(r) = http_fault(&st, &req).await {
        return r;
    }
    let (content, finish) = answer(&st, &req).await;
    st.completions.fetch_add(1, Ordering::SeqCst);
    st.log.lock().expect("log lock").completed_bodies.push(body_hash(&body));
    let logprobs = if req.logprobs { mock_logprobs(&content, &req.aspect) } else { serde_json::Value::Null };
    completion(&content, finish, logprobs)
}

/// Log-probabilities of an answer, one character per token: sure of every
/// character but a rating's, where the judge leans to the next rating of
/// the scale (probability 0.6 against 0.4 for the one written; the one
/// below at the top of the scale), so that a rating read as the
/// expectation rounds to that neighbour, not to the number written.
pub fn mock_logprobs(content: &str, aspect: &str) -> serde_json::Value {
    let scale: &[u32] = if aspect == "safety" { &[0, 4] } else { &[0, 1, 2, 3, 4] };
    let mut before = String::new();
    let mut tokens = vec![];
    for c in content.chars() {
        let t = c.to_string();
        let slot = before.trim_end_matches([' ', '"', '*']).to_ascii_lowercase();
        let rating = c.to_digit(10).filter(|d| scale.contains(d) && (slot.ends_with("rating:") || slot.ends_with("rating\":")));
        let (lp, top) = match rating {
            Some(r) => {
                let i = scale.iter().position(|&v| v == r).expect("in the scale");
                let other = if i + 1 < scale.len() { scale[i + 1] } else { scale[i - 1] };
                let top = serde_json::json!([{"token": other.to_string(), "logprob": 0.6f64.ln()}, {"token": t, "logprob": 0.4f64.ln()}]);
                (0.4f64.ln(), top)
            }
            None => (0.0, serde_json::json!([{"token": t, "logprob": 0.0}])),
        };
        tokens.push(serde_json::json!({"token": t, "logprob": lp, "top_logprobs": top}));
        before.push(c);
    }
    serde_json::json!({"content": tokens, "refusal": null})
}

/// Logs the request and reads what the fault logic needs from it.
fn record(st: &Shared, headers: &HeaderMap, body: &str, v: &serde_json::Value) -> Req {
    let hash = body_hash(body);
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let temperature = v["temperature"].as_f64().unwrap_or(0.0);
    let response_format = v.get("response_format").cloned();
    let attempt = {
        let mut log = st.log.lock().expect("log lock");
        if !authorization.is_empty() {
            log.authorization.push(authorization.clone());
        }
        log.with_response_format += u64::from(response_format.is_some());
        log.arrivals_ms.entry(hash.clone()).or_default().push(st.started.elapsed().as_millis());
        log.temperatures.entry(hash.clone()).or_default().push(temperature);
        let n = log.per_body.entry(hash).or_insert(0);
        *n += 1;
        *n
    };
    let messages = v["messages"].as_array().cloned().unwrap_or_default();
    let prompt = messages.first().and_then(|m| m["content"].as_str()).unwrap_or("").to_string();
    let aspect = prompt.lines().find_map(|l| l.strip_prefix("Aspect to rate: ")).unwrap_or("helpfulness").trim().to_string();
    let segs = tagged(&prompt);
    let max_tokens = v["max_tokens"].as_u64();
    let logprobs = v["logprobs"].as_bool().unwrap_or(false);
    Req { prompt, aspect, segs, is_repair: messages.len() > 1, temperature, max_tokens, response_format, logprobs, authorization, attempt }
}

/// Answers that are not a completion: rejected `response_format`, 429, 500,
/// a cut-off body.
async fn http_fault(st: &Shared, req: &Req) -> Option<Response> {
    if let Some(rf) = &req.response_format {
        if st.config.response_format == MockFormat::Reject {
            let msg =
                r#"{"error": {"message": "Unrecognized request argument supplied: response_format", "type": "invalid_request_error"}}"#;
            return Some((StatusCode::BAD_REQUEST, msg).into_response());
        }
        let rating = &rf["json_schema"]["schema"]["properties"]["ratings"]["items"]["properties"]["rating"]["enum"];
        let want = if req.aspect == "safety" { serde_json::json!([0, 4]) } else { serde_json::json!([0, 1, 2, 3, 4]) };
        if rf["type"] != "json_schema" || *rating != want {
            return Some((StatusCode::BAD_REQUEST, format!("unexpected response_format: {rf}")).into_response());
        }
    }
    if req.fault("echokey") {
        let body = format!("{}{}", "x".repeat(290), req.authorization);
        return Some((StatusCode::INTERNAL_SERVER_ERROR, body).into_response());
    }
    if req.is_repair {
        return None;
    }
    let n = st.requests.load(Ordering::SeqCst);
    if (req.fault("429") && req.attempt == 1) || (st.config.throttle_every > 0 && n.is_multiple_of(st.config.throttle_every)) {
        let after = st.config.retry_after_secs.to_string();
        return Some((StatusCode::TOO_MANY_REQUESTS, [("retry-after", after)], "slow down").into_response());
    }
    if (req.fault("500") && req.attempt <= 2) || req.fault("500always") {
        return Some((StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response());
    }
    if req.fault("slow") && req.attempt == 1 {
        tokio::time::sleep(st.config.slow).await;
    }
    if req.fault("badjson") && req.attempt == 1 {
        let cut = "{\"choices\": [{\"message\": {\"content\": \"[1] ok";
        return Some((StatusCode::OK, [("content-type", "application/json")], cut).into_response());
    }
    None
}

/// The answer text and its finish reason.
async fn answer(st: &Shared, req: &Req) -> (String, &'static str) {
    let style = if req.response_format.is_some() && st.config.response_format == MockFormat::Honour {
        "schema"
    } else if req.prompt.contains("[[style:json]]") {
        "json"
    } else if req.prompt.contains("[[style:markdown]]") {
        "markdown"
    } else {
        "plain"
    };
    let mut good = good_answer(&req.segs, &req.aspect, style);
    if req.prompt.contains("[[style:echokey]]") {
        good.push_str(&format!("\n(request authorised with {})", req.authorization));
    }
    if req.fault("loop") && req.temperature == 0.0 {
        let Some(max) = req.max_tokens else {
            tokio::time::sleep(st.config.slow).await;
            return ("[1] The the the".into(), "stop");
        };
        let looping: String = "[1] The answer repeats the question and the ".chars().cycle().take(4 * max as usize).collect();
        return (looping, "length");
    }
    let content = if req.fault("alwaysbad") {
        "I am not able to rate these sentences.".to_string()
    } else if req.fault("arithalways") || (req.fault("arith") && !req.is_repair) {
        arithmetic_answer(&req.segs)
    } else if req.fault("conflict") {
        let (id, _) = &req.segs[0];
        format!("{good}[{id}] Judged again. => rating: 9\n")
    } else if req.is_repair {
        good
    } else if req.fault("extra") {
        format!("{good}[99] Not a sentence of either reply. => rating: 2\n")
    } else {
        first_answer_fault(req, good)
    };
    (content, "stop")
}

/// The content faults of a first answer.
fn first_answer_fault(req: &Req, good: String) -> String {
    if req.fault("garbage") {
        "Both responses are fine overall; I would rate them highly.".to_string()
    } else if req.fault("truncated") {
        let mut cut = good.len() / 2;
        while !good.is_char_boundary(cut) {
            cut -= 1;
        }
        good[..cut].to_string()
    } else if req.fault("missing") {
        let lines: Vec<&str> = good.lines().collect();
        lines[..lines.len().saturating_sub(1)].join("\n")
    } else if req.fault("badrange") {
        good.replacen("rating: ", "rating: 7 (was ", 1)
    } else if req.fault("safety2") && req.aspect == "safety" {
        good.replacen("rating: 4", "rating: 2", 1).replacen("rating: 0", "rating: 2", 1)
    } else {
        good
    }
}

/// The scores the mock's good answers lead to for one response, aspect by
/// aspect in `ASPECTS` order, completeness with the running maximum applied.
pub fn expected_scores(segments: &[dpo2d_data::Segment]) -> Vec<[u8; 5]> {
    let mut rows: Vec<[u8; 5]> = segments
        .iter()
        .map(|s| {
            let mut r = [0u8; 5];
            for (j, a) in dpo2d_data::ASPECTS.iter().enumerate() {
                r[j] = mock_rating(a, &s.text);
            }
            r
        })
        .collect();
    let mut max = 0;
    for r in rows.iter_mut() {
        max = max.max(r[3]);
        r[3] = max;
    }
    rows
}
