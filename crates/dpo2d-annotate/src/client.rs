//! A minimal OpenAI-compatible chat-completions client with the retry
//! policy an annotation run over thousands of requests needs: per-request
//! timeout, exponential backoff with jitter, `Retry-After` on 429/503, and
//! retries on 5xx, timeouts and connection errors. The API key is held in a
//! [`Secret`] and scrubbed from every error message.

use rand::Rng;
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An API key. `Debug`/`Display` never show it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Retry and timeout settings.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub timeout: Duration,
    pub max_retries: u32,
    /// First backoff delay; doubles per retry (with jitter), capped at `max_backoff`.
    pub backoff_base: Duration,
    pub max_backoff: Duration,
    /// Upper bound on a server's `Retry-After`, so a bad header cannot stall a run.
    pub max_retry_after: Duration,
    /// After this many requests in a row gave up, the server is taken to be
    /// down and the run stops (a rerun resumes), instead of failing every pair.
    pub max_consecutive_failures: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            timeout: Duration::from_secs(120),
            max_retries: 5,
            backoff_base: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            max_consecutive_failures: 20,
        }
    }
}

/// Counters shared with the progress display and the summary.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// HTTP requests sent (including retries).
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    /// Requests currently waiting to retry.
    pub retrying_now: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Requests that got a completion.
    pub successes: AtomicU64,
    /// Requests that gave up since the last success.
    pub consecutive_failures: AtomicU64,
}

/// A successful completion.
#[derive(Debug, Clone)]
pub struct Completion {
    pub content: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// Gave up after retries, or a non-retryable answer for this request.
    #[error("{0}")]
    Request(String),
    /// The server refuses every request (bad key, wrong URL or model): stop the run.
    #[error("{0}")]
    Fatal(String),
}

pub struct ChatClient {
    http: reqwest::Client,
    url: String,
    key: Option<Secret>,
    pub policy: RetryPolicy,
    pub stats: Arc<ClientStats>,
}

#[derive(Deserialize)]
struct WireResponse {
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

enum Attempt {
    Done(Completion),
    /// Retry, optionally after the server's requested delay. `true` when the
    /// server could not be reached at all (no HTTP answer).
    Retry(String, Option<Duration>, bool),
    Fail(String),
    Fatal(String),
}

/// `{base_url}/chat/completions`, tolerating a trailing slash or a full URL.
pub fn endpoint(base_url: &str) -> String {
    let b = base_url.trim_end_matches('/');
    if b.ends_with("/chat/completions") {
        b.to_string()
    } else {
        format!("{b}/chat/completions")
    }
}

impl ChatClient {
    pub fn new(base_url: &str, key: Option<Secret>, policy: RetryPolicy) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(policy.timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot create the HTTP client: {e}"))?;
        Ok(ChatClient { http, url: endpoint(base_url), key, policy, stats: Arc::new(ClientStats::default()) })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Removes the key from any text that might be shown to a user.
    pub fn redact(&self, s: &str) -> String {
        match &self.key {
            Some(k) if !k.expose().is_empty() => s.replace(k.expose(), "***"),
            _ => s.to_string(),
        }
    }

    /// Sends `body` (an already-serialised JSON request), retrying per policy.
    pub async fn complete(&self, body: &str) -> Result<Completion, ChatError> {
        let mut attempt = 0u32;
        loop {
            let outcome = self.attempt(body).await;
            match outcome {
                Attempt::Done(c) => {
                    self.stats.successes.fetch_add(1, Ordering::Relaxed);
                    self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                    self.stats.prompt_tokens.fetch_add(c.prompt_tokens, Ordering::Relaxed);
                    self.stats.completion_tokens.fetch_add(c.completion_tokens, Ordering::Relaxed);
                    return Ok(c);
                }
                Attempt::Fail(msg) => return Err(ChatError::Request(self.redact(&msg))),
                Attempt::Fatal(msg) => return Err(ChatError::Fatal(self.redact(&msg))),
                Attempt::Retry(msg, after, unreachable) => {
                    if attempt >= self.policy.max_retries {
                        let msg = format!("gave up after {} attempts: {msg}", attempt + 1);
                        let in_a_row = self.stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                        if unreachable && self.stats.successes.load(Ordering::Relaxed) == 0 {
                            return Err(ChatError::Fatal(self.redact(&format!("{msg} (is the server running, and is --base-url right?)"))));
                        }
                        if in_a_row >= self.policy.max_consecutive_failures.max(1) {
                            return Err(ChatError::Fatal(
                                self.redact(&format!(
                                    "{in_a_row} requests in a row failed, the server seems to be down; last error: {msg}"
                                )),
                            ));
                        }
                        return Err(ChatError::Request(self.redact(&msg)));
                    }
                    let delay = match after {
                        Some(d) => d.min(self.policy.max_retry_after),
                        None => self.backoff(attempt),
                    };
                    tracing::debug!("request failed ({}), retrying in {:?}", self.redact(&msg), delay);
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    self.stats.retrying_now.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    self.stats.retrying_now.fetch_sub(1, Ordering::Relaxed);
                    attempt += 1;
                }
            }
        }
    }

    /// Exponential backoff with "equal jitter": half fixed, half random.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.policy.backoff_base.saturating_mul(1u32 << attempt.min(20));
        let capped = exp.min(self.policy.max_backoff);
        let half = capped / 2;
        let jitter = rand::thread_rng().gen_range(0.0..=1.0);
        half + half.mul_f64(jitter)
    }

    async fn attempt(&self, body: &str) -> Attempt {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .http
            .post(&self.url)
            .timeout(self.policy.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(k) = &self.key {
            req = req.bearer_auth(k.expose());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Attempt::Retry(format!("no answer within {:?}", self.policy.timeout), None, false),
            Err(e) => return Attempt::Retry(format!("cannot reach {}: {}", self.url, error_chain(&e)), None, e.is_connect()),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) if e.is_timeout() => {
                return Attempt::Retry(format!("answer not complete within {:?}", self.policy.timeout), None, false)
            }
            Err(e) => return Attempt::Retry(format!("answer cut off: {}", error_chain(&e)), None, false),
        };
        let snippet: String = text.chars().take(300).collect();
        if status.is_success() {
            return match serde_json::from_str::<WireResponse>(&text) {
                Ok(w) => {
                    let content = w.choices.into_iter().next().and_then(|c| c.message.content);
                    match content {
                        Some(content) => {
                            let (p, c) = w.usage.map(|u| (u.prompt_tokens, u.completion_tokens)).unwrap_or((0, 0));
                            Attempt::Done(Completion { content, prompt_tokens: p, completion_tokens: c })
                        }
                        None => Attempt::Retry("the answer has no message content".into(), None, false),
                    }
                }
                // A 200 whose body is not a complete completion object: a
                // proxy hiccup or a cut connection, worth another try.
                Err(e) => Attempt::Retry(format!("the answer is not a chat completion ({e}): {snippet}"), None, false),
            };
        }
        let code = status.as_u16();
        let msg = format!("server answered {status}: {snippet}");
        match code {
            429 | 503 => Attempt::Retry(msg, retry_after, false),
            408 | 409 | 425 => Attempt::Retry(msg, None, false),
            500..=599 => Attempt::Retry(msg, None, false),
            401 | 403 => Attempt::Fatal(format!("{msg} (check the API key: --api-key-env names the variable that holds it)")),
            404 | 405 => Attempt::Fatal(format!("{msg} (check --base-url, which should end in /v1, and --model)")),
            _ => Attempt::Fail(msg),
        }
    }
}

/// The innermost causes of an error, without reqwest's outer "error sending
/// request for url (...)" (the caller already names the URL).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut src = e.source();
    while let Some(x) = src {
        parts.push(x.to_string());
        src = x.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(endpoint("http://h:8000/v1"), "http://h:8000/v1/chat/completions");
        assert_eq!(endpoint("http://h:8000/v1/"), "http://h:8000/v1/chat/completions");
        assert_eq!(endpoint("http://h/v1/chat/completions"), "http://h/v1/chat/completions");
    }

    #[test]
    fn secret_is_hidden_and_redacted() {
        let k = Secret::new("sk-VERYSECRET".into());
        assert!(!format!("{k:?}").contains("VERYSECRET"));
        let c = ChatClient::new("http://127.0.0.1:1/v1", Some(k), RetryPolicy::default()).unwrap();
        assert_eq!(c.redact("echo sk-VERYSECRET back"), "echo *** back");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy =
            RetryPolicy { backoff_base: Duration::from_millis(100), max_backoff: Duration::from_millis(1000), ..Default::default() };
        let c = ChatClient::new("http://127.0.0.1:1/v1", None, policy).unwrap();
        for _ in 0..20 {
            let d0 = c.backoff(0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100), "{d0:?}");
            let d3 = c.backoff(3);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800), "{d3:?}");
            let d9 = c.backoff(9);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000), "{d9:?}");
        }
    }
}
