//! The judge's settings: where the OpenAI-compatible server is, which model,
//! the key, and how hard to push it. One type for every command that asks a
//! judge (`annotate`, `eval`, `iterate --scorer judge:URL`), so that they
//! share flag names and defaults.

use crate::client::{ChatClient, ChatError, Completion, RetryPolicy, Secret};
use crate::expectation::RatingFrom;
use crate::prompt::{ChatRequest, ResponseFormat};
use std::sync::atomic::{AtomicBool, Ordering};

/// How to reach the judge and how hard to push it.
#[derive(Debug, Clone)]
pub struct JudgeSettings {
    /// The servers' OpenAI-compatible base URLs, e.g. `http://localhost:8000/v1`:
    /// one, or a fleet that shares the requests.
    pub base_urls: Vec<String>,
    /// The model name, as the server knows it.
    pub model: String,
    /// Sent as a Bearer token; local servers need none.
    pub api_key: Option<Secret>,
    /// Most requests in flight at once on each server (lowered for a while
    /// on a server whose requests time out).
    pub concurrency: usize,
    /// Per-request timeout, retries and backoff.
    pub policy: RetryPolicy,
    /// `max_tokens` of every request: `None` sizes it by the request's kind
    /// (annotation: by the pair's segments; evaluation: by the judgement),
    /// `Some(0)` sends none.
    pub max_tokens: Option<u32>,
    /// How the judge is asked to write its answer.
    pub response_format: ResponseFormat,
    /// How a rating is read: the number written, or the expectation over
    /// the rating tokens' probabilities.
    pub rating_from: RatingFrom,
}

impl JudgeSettings {
    /// Most requests in flight when none is given: what a hosted API takes
    /// comfortably; a local server wants its parallel slots.
    pub const DEFAULT_CONCURRENCY: usize = 8;

    /// The defaults for a judge at `base_url` serving `model`.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        JudgeSettings {
            base_urls: vec![base_url.into()],
            model: model.into(),
            api_key: None,
            concurrency: Self::DEFAULT_CONCURRENCY,
            policy: RetryPolicy::default(),
            max_tokens: None,
            response_format: ResponseFormat::default(),
            rating_from: RatingFrom::default(),
        }
    }

    /// An HTTP client for this judge.
    pub fn client(&self) -> anyhow::Result<ChatClient> {
        ChatClient::new(&self.base_urls, self.api_key.clone(), self.policy.clone(), self.concurrency)
    }

    /// The servers, for messages: `URL` or `URL, URL, ...`.
    pub fn servers(&self) -> String {
        self.base_urls.join(", ")
    }

    /// `max_tokens` for a request whose own budget is `default` (0 = none).
    pub fn max_tokens_or(&self, default: u32) -> Option<u32> {
        Some(self.max_tokens.unwrap_or(default)).filter(|&n| n > 0)
    }
}

/// The response format of one run's requests: a JSON schema or free text,
/// as [`JudgeSettings::response_format`] asks, and, in auto mode, free text
/// from the first time the server turns a schema down. Annotation and
/// evaluation share it, so both fall back the same way on the same server.
#[derive(Debug)]
pub struct FormatChoice {
    format: ResponseFormat,
    free_text_only: AtomicBool,
}

impl FormatChoice {
    pub fn new(format: ResponseFormat) -> Self {
        FormatChoice { format, free_text_only: AtomicBool::new(false) }
    }

    /// The forms an answer may be cached in, preferred first (`true`: asked with a schema).
    pub fn forms(&self) -> &'static [bool] {
        match self.format {
            ResponseFormat::FreeText => &[false],
            ResponseFormat::JsonSchema => &[true],
            ResponseFormat::Auto if self.fell_back() => &[false, true],
            ResponseFormat::Auto => &[true, false],
        }
    }

    /// Whether the server turned a schema down, so answers are asked as free text.
    pub fn fell_back(&self) -> bool {
        self.free_text_only.load(Ordering::Relaxed)
    }

    /// Sends `build(structured)` in the preferred form. In auto mode a server
    /// that rejects `response_format` gets the free-text request, now and for
    /// the rest of the run; with `json-schema` the rejection stops the run.
    pub async fn complete(&self, client: &ChatClient, build: impl Fn(bool) -> ChatRequest) -> Result<(ChatRequest, Completion), ChatError> {
        let req = build(self.forms()[0]);
        match client.complete(&req).await {
            Ok(c) => Ok((req, c)),
            Err(ChatError::FormatRejected(m)) if self.format == ResponseFormat::Auto => {
                if !self.free_text_only.swap(true, Ordering::SeqCst) {
                    tracing::warn!("the server does not take response_format ({m}); asking for free-text answers for the rest of the run");
                }
                let req = build(false);
                client.complete(&req).await.map(|c| (req, c))
            }
            Err(ChatError::FormatRejected(m)) => Err(ChatError::Fatal(format!(
                "{m} (the server does not take response_format with a JSON schema; use --judge-response-format auto or free-text)"
            ))),
            Err(e) => Err(e),
        }
    }
}
