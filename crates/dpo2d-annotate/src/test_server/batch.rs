//! The mock judge's fake OpenAI Batch API: `POST /v1/files` (multipart,
//! purpose `batch`), `POST /v1/batches`, `GET /v1/batches/{id}` and `GET
//! /v1/files/{id}/content`. A batch is `in_progress` for
//! [`BatchConfig::polls_to_finish`] polls, then its lines are answered by
//! the mock's own chat handler (faults included) into an output and an
//! error file, as OpenAI writes them.

use super::{handle, MockStats, Shared};
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// How the fake Batch API behaves.
#[derive(Debug, Clone, Default)]
pub struct BatchConfig {
    /// Polls a batch answers `in_progress` before it finishes.
    pub polls_to_finish: u32,
    /// In the first batch, every Nth line (from the first) fails with a 500 in the error file (0: none).
    pub fail_every_first: usize,
    /// The batch with this number (1 = the first created) expires: the second
    /// half of its lines go to the error file as `batch_expired`.
    pub expire_batch: Option<usize>,
}

#[derive(Default)]
pub(super) struct BatchState {
    files: HashMap<String, String>,
    batches: HashMap<String, FakeBatch>,
    next_id: usize,
    created: usize,
    submissions: HashMap<String, u32>,
    answers: HashMap<String, u32>,
}

#[derive(Clone)]
struct FakeBatch {
    number: usize,
    input_file_id: String,
    polls: u32,
    status: &'static str,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    total: usize,
    completed: usize,
    failed: usize,
}

impl BatchState {
    pub(super) fn fill(&self, s: &mut MockStats) {
        s.batches_created = self.created;
        s.batch_submissions = self.submissions.clone();
        s.batch_answers = self.answers.clone();
    }

    pub(super) fn forget_counts(&mut self) {
        self.created = 0;
        self.submissions.clear();
        self.answers.clear();
    }

    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }
}

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/files", post(upload))
        .route("/v1/files/:id/content", get(content))
        .route("/v1/batches", post(create))
        .route("/v1/batches/:id", get(status))
}

fn error(code: StatusCode, msg: &str) -> Response {
    (code, Json(json!({"error": {"message": msg}}))).into_response()
}

async fn upload(State(st): State<Arc<Shared>>, mut form: Multipart) -> Response {
    let (mut purpose, mut file) = (None, None);
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => file = field.text().await.ok(),
            _ => {}
        }
    }
    let (Some(purpose), Some(file)) = (purpose, file) else { return error(StatusCode::BAD_REQUEST, "purpose and file are required") };
    if purpose != "batch" {
        return error(StatusCode::BAD_REQUEST, "purpose must be batch");
    }
    let mut b = st.batch.lock().expect("batch lock");
    let id = b.new_id("file");
    let bytes = file.len();
    b.files.insert(id.clone(), file);
    Json(json!({"id": id, "object": "file", "bytes": bytes, "purpose": "batch"})).into_response()
}

async fn content(State(st): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match st.batch.lock().expect("batch lock").files.get(&id) {
        Some(text) => text.clone().into_response(),
        None => error(StatusCode::NOT_FOUND, "no such file"),
    }
}

async fn create(State(st): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    if body["endpoint"] != "/v1/chat/completions" || body["completion_window"] != "24h" {
        return error(StatusCode::BAD_REQUEST, "endpoint must be /v1/chat/completions and completion_window 24h");
    }
    let input = body["input_file_id"].as_str().unwrap_or("").to_string();
    let mut b = st.batch.lock().expect("batch lock");
    let Some(text) = b.files.get(&input).cloned() else { return error(StatusCode::BAD_REQUEST, "no such input file") };
    let mut total = 0;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        if v["method"] != "POST" || v["url"] != "/v1/chat/completions" || !v["custom_id"].is_string() {
            return error(StatusCode::BAD_REQUEST, &format!("bad input line: {line}"));
        }
        *b.submissions.entry(v["custom_id"].as_str().unwrap_or("").to_string()).or_insert(0) += 1;
        total += 1;
    }
    b.created += 1;
    let id = b.new_id("batch");
    let batch = FakeBatch {
        number: b.created,
        input_file_id: input,
        polls: 0,
        status: "validating",
        output_file_id: None,
        error_file_id: None,
        total,
        completed: 0,
        failed: 0,
    };
    let view = describe(&id, &batch);
    b.batches.insert(id, batch);
    Json(view).into_response()
}

fn describe(id: &str, b: &FakeBatch) -> Value {
    json!({
        "id": id, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": b.input_file_id,
        "completion_window": "24h", "status": b.status, "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
    })
}

async fn status(State(st): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let batch = {
        let mut b = st.batch.lock().expect("batch lock");
        let Some(batch) = b.batches.get_mut(&id) else { return error(StatusCode::NOT_FOUND, "no such batch") };
        batch.polls += 1;
        if batch.status == "validating" || batch.status == "in_progress" {
            batch.status = "in_progress";
        }
        batch.clone()
    };
    if batch.status != "in_progress" || batch.polls <= st.config.batch.polls_to_finish {
        return Json(describe(&id, &batch)).into_response();
    }
    let input = st.batch.lock().expect("batch lock").files[&batch.input_file_id].clone();
    let done = run_lines(&st, &batch, &input).await;
    let mut b = st.batch.lock().expect("batch lock");
    let out_id = b.new_id("file");
    let err_id = b.new_id("file");
    b.files.insert(out_id.clone(), done.output);
    b.files.insert(err_id.clone(), done.errors);
    for cid in done.answered {
        *b.answers.entry(cid).or_insert(0) += 1;
    }
    let batch = b.batches.get_mut(&id).expect("still there");
    batch.status = if done.expired { "expired" } else { "completed" };
    batch.output_file_id = Some(out_id);
    batch.error_file_id = Some(err_id);
    batch.completed = done.completed;
    batch.failed = done.failed;
    Json(describe(&id, batch)).into_response()
}

struct LinesDone {
    output: String,
    errors: String,
    answered: Vec<String>,
    completed: usize,
    failed: usize,
    expired: bool,
}

/// Answers a batch's lines with the mock's chat handler, applying the
/// configured failures and expiry.
async fn run_lines(st: &Arc<Shared>, batch: &FakeBatch, input: &str) -> LinesDone {
    let cfg = &st.config.batch;
    let expired = cfg.expire_batch == Some(batch.number);
    let mut done = LinesDone { output: String::new(), errors: String::new(), answered: vec![], completed: 0, failed: 0, expired };
    for (n, line) in input.lines().enumerate() {
        let v: Value = serde_json::from_str(line).expect("checked at creation");
        let cid = v["custom_id"].as_str().unwrap_or("").to_string();
        let error_line =
            |response: Value, error: Value| json!({"id": format!("req-{n}"), "custom_id": cid, "response": response, "error": error});
        if expired && n >= batch.total / 2 {
            let e = json!({"code": "batch_expired", "message": "This request could not be executed before the completion window expired."});
            done.errors.push_str(&format!("{}\n", error_line(Value::Null, e)));
            done.failed += 1;
            continue;
        }
        if batch.number == 1 && cfg.fail_every_first > 0 && n % cfg.fail_every_first == 0 {
            let resp = json!({"status_code": 500, "request_id": format!("q-{n}"), "body": {"error": {"message": "internal error"}}});
            done.errors.push_str(&format!("{}\n", error_line(resp, Value::Null)));
            done.failed += 1;
            continue;
        }
        let answer = handle(State(st.clone()), HeaderMap::new(), v["body"].to_string()).await;
        let code = answer.status().as_u16();
        let bytes = axum::body::to_bytes(answer.into_body(), usize::MAX).await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({"error": {"message": String::from_utf8_lossy(&bytes)}}));
        let resp = json!({"status_code": code, "request_id": format!("q-{n}"), "body": body});
        if code == 200 {
            done.output.push_str(&format!("{}\n", error_line(resp, Value::Null)));
            done.answered.push(cid);
            done.completed += 1;
        } else {
            done.errors.push_str(&format!("{}\n", error_line(resp, Value::Null)));
            done.failed += 1;
        }
    }
    done
}

/// What vLLM's `run_batch` does with a request file: every line answered
/// by the mock's chat handler, as an output file.
pub async fn run_batch_file(judge_base_url: &str, input: &str) -> String {
    let http = reqwest::Client::new();
    let mut out = String::new();
    for (n, line) in input.lines().enumerate() {
        let v: Value = serde_json::from_str(line).expect("a request line");
        let r = http.post(format!("{judge_base_url}/chat/completions")).json(&v["body"]).send().await.expect("the mock answers");
        let code = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let resp = json!({"status_code": code, "request_id": format!("q-{n}"), "body": body});
        out.push_str(&format!("{}\n", json!({"id": format!("req-{n}"), "custom_id": v["custom_id"], "response": resp, "error": null})));
    }
    out
}
