//! The judge's options, shared by `annotate` and `eval`: where the
//! OpenAI-compatible server is, which model, the key's variable, and how
//! hard to try.

use anyhow::{bail, Context, Result};
use dpo2d_annotate::{RetryPolicy, Secret};
use std::time::Duration;

#[derive(clap::Args)]
pub struct JudgeArgs {
    /// The judge server's OpenAI-compatible base URL, e.g. http://localhost:8000/v1.
    #[arg(long)]
    pub base_url: Option<String>,
    /// The judge model name, as the server knows it.
    #[arg(long)]
    pub model: Option<String>,
    /// Name of the environment variable holding the API key (sent as a Bearer token; optional for local servers).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Most requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Per-request timeout in seconds (fractions allowed).
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    pub timeout: f64,
    /// Retries per request on 429, 5xx, timeouts and connection errors.
    #[arg(long, default_value_t = 5)]
    pub max_retries: u32,
    /// First retry delay in seconds; doubles per retry, with jitter (a server's Retry-After wins).
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    pub retry_backoff: f64,
}

impl JudgeArgs {
    pub fn model(&self) -> Result<String> {
        self.model.clone().context("--model (the judge model, as its server names it) is required")
    }

    pub fn base_url(&self) -> Result<String> {
        self.base_url.clone().context("--base-url (the judge server, e.g. http://localhost:8000/v1) is required")
    }

    pub fn concurrency(&self) -> Result<usize> {
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        Ok(self.concurrency)
    }

    /// The key is read from the environment and never printed; an explicitly
    /// named variable that is unset is an error, the default one
    /// (OPENAI_API_KEY) is optional.
    pub fn api_key(&self) -> Result<Option<Secret>> {
        Ok(match &self.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(Secret::new(k)),
                _ => bail!("--api-key-env names {var}, but that environment variable is not set"),
            },
            None => std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty()).map(Secret::new),
        })
    }

    pub fn policy(&self) -> Result<RetryPolicy> {
        let secs = |v: f64, name: &str| -> Result<Duration> {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero() || name == "--retry-backoff")
                .with_context(|| format!("{name} must be a positive number of seconds, got {v}"))
        };
        Ok(RetryPolicy {
            timeout: secs(self.timeout, "--timeout")?,
            max_retries: self.max_retries,
            backoff_base: secs(self.retry_backoff, "--retry-backoff")?,
            ..RetryPolicy::default()
        })
    }
}
