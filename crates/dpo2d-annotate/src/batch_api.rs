//! The OpenAI Batch API and its file formats: judge requests as batch input
//! lines (`custom_id`, `method`, `url`, `body`), split at the API's limits,
//! uploaded (`POST /v1/files`, purpose `batch`), run as a batch (`POST
//! /v1/batches`, 24 h window), polled (`GET /v1/batches/{id}`) and read back
//! (`GET /v1/files/{id}/content`). The same files run through vLLM's offline
//! `run_batch`, whose output lines have the same shape.

use crate::client::{read_completion, Completion, RetryPolicy, Secret};
use crate::prompt::ChatRequest;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::time::Duration;

/// The endpoint every line asks.
pub const ENDPOINT: &str = "/v1/chat/completions";

/// How large one batch input file may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_requests: usize,
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    /// OpenAI's limits per batch: 50,000 requests and a 200 MB file.
    fn default() -> Self {
        BatchLimits { max_requests: 50_000, max_bytes: 200 * 1000 * 1000 }
    }
}

/// One input line: the request `body` under its `custom_id`.
pub fn request_line(custom_id: &str, body: &ChatRequest) -> String {
    serde_json::json!({ "custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body }).to_string()
}

/// Groups lines into files within `limits`, in order: the indices of each file's lines.
pub fn split(lines: &[String], limits: BatchLimits) -> Vec<Vec<usize>> {
    let mut files: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for (i, line) in lines.iter().enumerate() {
        let size = line.len() + 1;
        match files.last_mut() {
            Some(f) if f.len() < limits.max_requests && bytes + size <= limits.max_bytes => {
                f.push(i);
                bytes += size;
            }
            _ => {
                files.push(vec![i]);
                bytes = size;
            }
        }
    }
    files
}

/// What a results line says about its request.
#[derive(Debug)]
pub enum LineResult {
    Answer(Completion),
    /// The request failed at the server (or expired); worth another batch.
    Failed(String),
}

#[derive(Deserialize)]
struct ResultLine {
    custom_id: String,
    #[serde(default)]
    response: Option<ResultResponse>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ResultResponse {
    status_code: u16,
    #[serde(default)]
    body: serde_json::Value,
}

/// Reads an output or error file (OpenAI's, or vLLM `run_batch`'s output):
/// `(custom_id, result)` per line.
pub fn read_results(text: &str) -> Result<Vec<(String, LineResult)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: ResultLine = serde_json::from_str(line).with_context(|| format!("results line {} is not a batch result", n + 1))?;
        let result = match (r.response, r.error) {
            (_, Some(e)) if !e.is_null() => LineResult::Failed(error_text(&e)),
            (Some(resp), _) if resp.status_code == 200 => match read_completion(&resp.body.to_string()) {
                Ok(c) => LineResult::Answer(c),
                Err(e) => LineResult::Failed(e),
            },
            (Some(resp), _) => LineResult::Failed(format!("status {}: {}", resp.status_code, error_text(&resp.body))),
            (None, _) => LineResult::Failed("no response".into()),
        };
        out.push((r.custom_id, result));
    }
    Ok(out)
}

fn error_text(v: &serde_json::Value) -> String {
    let e = v.get("error").unwrap_or(v);
    let text = match (e.get("code").and_then(|c| c.as_str()), e.get("message").and_then(|m| m.as_str())) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (None, Some(m)) => m.to_string(),
        _ => e.to_string(),
    };
    text.chars().take(300).collect()
}

/// A batch as `GET /v1/batches/{id}` shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchStatus {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

impl BatchStatus {
    /// Nothing more will happen to it: its files can be read.
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "expired" | "cancelled")
    }
}

/// The Batch API of one OpenAI-compatible server, with the judge's retry policy.
pub struct BatchApi {
    http: reqwest::Client,
    base: String,
    key: Option<Secret>,
    policy: RetryPolicy,
}

#[derive(Deserialize)]
struct FileObject {
    id: String,
}

impl BatchApi {
    pub fn new(base_url: &str, key: Option<Secret>, policy: RetryPolicy) -> Result<Self> {
        let http = reqwest::Client::builder().build().context("cannot create the HTTP client")?;
        Ok(BatchApi { http, base: base_url.trim_end_matches('/').to_string(), key, policy })
    }

    /// Uploads a batch input file; its id.
    pub async fn upload(&self, name: &str, jsonl: &str) -> Result<String> {
        let url = format!("{}/files", self.base);
        let text = self
            .send(&format!("uploading {name}"), || {
                let part = reqwest::multipart::Part::text(jsonl.to_string()).file_name(name.to_string());
                let part = part.mime_str("application/jsonl").expect("a valid MIME type");
                let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
                self.http.post(&url).multipart(form)
            })
            .await?;
        Ok(serde_json::from_str::<FileObject>(&text).with_context(|| format!("the upload of {name} answered no file id"))?.id)
    }

    /// Starts a batch over an uploaded file.
    pub async fn create(&self, input_file_id: &str) -> Result<BatchStatus> {
        let url = format!("{}/batches", self.base);
        let body = serde_json::json!({ "input_file_id": input_file_id, "endpoint": ENDPOINT, "completion_window": "24h" });
        let text = self.send("creating a batch", || self.http.post(&url).json(&body)).await?;
        serde_json::from_str(&text).context("the server's answer to creating a batch is not a batch")
    }

    pub async fn status(&self, id: &str) -> Result<BatchStatus> {
        let url = format!("{}/batches/{id}", self.base);
        let text = self.send(&format!("polling batch {id}"), || self.http.get(&url)).await?;
        serde_json::from_str(&text).with_context(|| format!("the status of batch {id} is not a batch"))
    }

    /// A file's content (a batch's output or error file).
    pub async fn content(&self, file_id: &str) -> Result<String> {
        let url = format!("{}/files/{file_id}/content", self.base);
        self.send(&format!("reading file {file_id}"), || self.http.get(&url)).await
    }

    /// Sends what `build` makes, retrying on 429, 5xx and connection errors per policy.
    async fn send(&self, what: &str, build: impl Fn() -> reqwest::RequestBuilder) -> Result<String> {
        let mut last = String::new();
        for attempt in 0..=self.policy.max_retries {
            if attempt > 0 {
                let wait = self.policy.backoff_base.saturating_mul(1 << (attempt - 1).min(10)).min(self.policy.max_backoff);
                tokio::time::sleep(wait).await;
            }
            let mut req = build().timeout(self.policy.timeout);
            if let Some(k) = &self.key {
                req = req.bearer_auth(k.expose());
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        return Ok(text);
                    }
                    last = format!("server answered {status}: {}", self.redact(&text).chars().take(300).collect::<String>());
                    if !(status.as_u16() == 429 || status.is_server_error()) {
                        bail!("{what}: {last}");
                    }
                }
                Err(e) => last = self.redact(&format!("cannot reach {}: {e}", self.base)),
            }
        }
        bail!("{what}: gave up after {} attempts: {last}", self.policy.max_retries + 1)
    }

    fn redact(&self, s: &str) -> String {
        self.key.as_ref().map(|k| k.redact(s)).unwrap_or_else(|| s.to_string())
    }
}

/// The default pause between polls of a running batch.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_split_at_the_request_and_byte_limits() {
        let lines: Vec<String> = (0..7).map(|i| "x".repeat(9 + i % 2)).collect();
        // By count: 3 per file.
        let by_count = split(&lines, BatchLimits { max_requests: 3, max_bytes: 1 << 20 });
        assert_eq!(by_count, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        // By bytes: each line is 10 or 11 bytes with its newline; 25 bytes hold two.
        let by_bytes = split(&lines, BatchLimits { max_requests: 100, max_bytes: 25 });
        assert_eq!(by_bytes, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6]]);
        assert!(split(&[], BatchLimits::default()).is_empty());
    }

    #[test]
    fn result_lines_as_openai_and_vllm_write_them() {
        let ok = r#"{"id":"r1","custom_id":"a","response":{"status_code":200,"request_id":"q","body":{"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}},"error":null}"#;
        let expired = r#"{"id":"r2","custom_id":"b","response":null,"error":{"code":"batch_expired","message":"This request could not be executed before the completion window expired."}}"#;
        let rate = r#"{"id":"r3","custom_id":"c","response":{"status_code":429,"body":{"error":{"message":"slow down"}}},"error":null}"#;
        let r = read_results(&format!("{ok}\n\n{expired}\n{rate}\n")).unwrap();
        assert_eq!(r.len(), 3);
        assert!(matches!(&r[0], (id, LineResult::Answer(c)) if id == "a" && c.content == "hi" && c.prompt_tokens == 5));
        assert!(matches!(&r[1], (id, LineResult::Failed(m)) if id == "b" && m.starts_with("batch_expired")));
        assert!(matches!(&r[2], (id, LineResult::Failed(m)) if id == "c" && m == "status 429: slow down"));
        assert!(read_results("{not json").is_err());
    }
}
