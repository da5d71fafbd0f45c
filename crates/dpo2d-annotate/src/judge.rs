//! The judge's settings: where the OpenAI-compatible server is, which model,
//! the key, and how hard to push it. One type for every command that asks a
//! judge (`annotate`, `eval`, `iterate --scorer judge:URL`), so that they
//! share flag names and defaults.

use crate::client::{ChatClient, RetryPolicy, Secret};
use crate::prompt::ResponseFormat;

/// How to reach the judge and how hard to push it.
#[derive(Debug, Clone)]
pub struct JudgeSettings {
    /// The server's OpenAI-compatible base URL, e.g. `http://localhost:8000/v1`.
    pub base_url: String,
    /// The model name, as the server knows it.
    pub model: String,
    /// Sent as a Bearer token; local servers need none.
    pub api_key: Option<Secret>,
    /// Most requests in flight at once (annotation lowers it for a while
    /// when requests time out).
    pub concurrency: usize,
    /// Per-request timeout, retries and backoff.
    pub policy: RetryPolicy,
    /// `max_tokens` of every request: `None` sizes it by the request's kind
    /// (annotation: by the pair's segments; evaluation: by the judgement),
    /// `Some(0)` sends none.
    pub max_tokens: Option<u32>,
    /// How the judge is asked to write its answer.
    pub response_format: ResponseFormat,
}

impl JudgeSettings {
    /// Most requests in flight when none is given: what a hosted API takes
    /// comfortably; a local server wants its parallel slots.
    pub const DEFAULT_CONCURRENCY: usize = 8;

    /// The defaults for a judge at `base_url` serving `model`.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        JudgeSettings {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            concurrency: Self::DEFAULT_CONCURRENCY,
            policy: RetryPolicy::default(),
            max_tokens: None,
            response_format: ResponseFormat::default(),
        }
    }

    /// An HTTP client for this judge.
    pub fn client(&self) -> anyhow::Result<ChatClient> {
        ChatClient::new(&self.base_url, self.api_key.clone(), self.policy.clone(), self.concurrency)
    }

    /// `max_tokens` for a request whose own budget is `default` (0 = none).
    pub fn max_tokens_or(&self, default: u32) -> Option<u32> {
        Some(self.max_tokens.unwrap_or(default)).filter(|&n| n > 0)
    }
}
