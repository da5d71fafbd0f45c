//! The judge's flags: one block, shared by `annotate`, `eval` and `iterate
//! --scorer judge:URL`, with the same names and defaults everywhere; it
//! builds the library's one [`JudgeSettings`]. `annotate` and `eval` also
//! take the names without `judge-` (`--base-url`, `--model`, ...); `iterate`
//! does not, since there `--model` is the policy.

use anyhow::{bail, Context, Result};
use dpo2d_annotate::expectation::RatingFrom;
use dpo2d_annotate::{JudgeSettings, ResponseFormat, RetryPolicy, Secret};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Judge")]
pub struct JudgeArgs {
    /// The judge server's OpenAI-compatible base URL, e.g. http://localhost:8000/v1; repeat it for a fleet of servers (iterate: --scorer judge:URL, plus these) [default: none].
    #[arg(long, visible_alias = "base-url", value_name = "URL")]
    pub judge_base_url: Vec<String>,
    /// The judge model, as its server names it (needed wherever a judge is asked) [default: none].
    #[arg(long, visible_alias = "model", value_name = "NAME")]
    pub judge_model: Option<String>,
    /// Environment variable holding the API key, sent as a Bearer token [default: OPENAI_API_KEY if set].
    #[arg(long, visible_alias = "api-key-env", value_name = "VAR")]
    pub judge_api_key_env: Option<String>,
    /// Most requests in flight at once, per server (a local server: its parallel slots).
    #[arg(long, visible_alias = "concurrency", value_name = "N", default_value_t = JudgeSettings::DEFAULT_CONCURRENCY)]
    pub judge_concurrency: usize,
    /// Per-request timeout in seconds.
    #[arg(long, visible_alias = "timeout", value_name = "SECS", default_value_t = RetryPolicy::default().timeout.as_secs_f64())]
    pub judge_timeout: f64,
    /// Retries per request on 429, 5xx, timeouts and connection errors.
    #[arg(long, visible_alias = "max-retries", value_name = "N", default_value_t = RetryPolicy::default().max_retries)]
    pub judge_max_retries: u32,
    /// First retry delay in seconds, doubled per retry with jitter (a server's Retry-After wins).
    #[arg(long, visible_alias = "retry-backoff", value_name = "SECS",
          default_value_t = RetryPolicy::default().backoff_base.as_secs_f64())]
    pub judge_retry_backoff: f64,
    /// Cap on each judge answer (0: none) [default: by request: annotate 64 + 48 per segment, eval 64-1024].
    #[arg(long, visible_alias = "max-tokens", value_name = "N")]
    pub judge_max_tokens: Option<u32>,
    /// How the judge answers: a JSON schema (structured outputs), free text, or auto (schema, else free text).
    #[arg(long, visible_alias = "response-format", value_enum, default_value_t = FormatArg::Auto)]
    pub judge_response_format: FormatArg,
    /// How a rating is read: the number written, the expectation over the rating tokens' log-probabilities, or auto (those where the server returns them).
    #[arg(long, visible_alias = "rating-from", value_enum, default_value_t = RatingArg::Text)]
    pub judge_rating_from: RatingArg,
}

/// The values of `--judge-rating-from`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RatingArg {
    Text,
    Logprobs,
    Auto,
}

impl From<RatingArg> for RatingFrom {
    fn from(r: RatingArg) -> Self {
        match r {
            RatingArg::Text => RatingFrom::Text,
            RatingArg::Logprobs => RatingFrom::Logprobs,
            RatingArg::Auto => RatingFrom::Auto,
        }
    }
}

/// The values of `--judge-response-format`, parsed once by clap; the
/// library's [`ResponseFormat`] stays free of clap.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum FormatArg {
    Auto,
    JsonSchema,
    FreeText,
}

impl From<FormatArg> for ResponseFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Auto => ResponseFormat::Auto,
            FormatArg::JsonSchema => ResponseFormat::JsonSchema,
            FormatArg::FreeText => ResponseFormat::FreeText,
        }
    }
}

/// For `#[command(mut_args(judge::prefixed_only))]`: the judge flags of a
/// command keep only their `--judge-*` names.
pub fn prefixed_only(a: clap::Arg) -> clap::Arg {
    if a.get_id().as_str().starts_with("judge_") {
        a.visible_alias(None)
    } else {
        a
    }
}

impl JudgeArgs {
    /// Whether any flag names a judge (some commands run without one).
    pub fn given(&self) -> bool {
        !self.judge_base_url.is_empty() || self.judge_model.is_some()
    }

    /// The settings: the servers are `first_url` (iterate's `judge:URL`) and
    /// those of the flags.
    pub fn settings(&self, first_url: Option<&str>) -> Result<JudgeSettings> {
        let base_urls: Vec<String> = first_url.map(str::to_string).into_iter().chain(self.judge_base_url.iter().cloned()).collect();
        if base_urls.is_empty() {
            bail!("--judge-base-url (the judge server, e.g. http://localhost:8000/v1) is required");
        }
        let model = self.judge_model.clone().context("--judge-model (the judge model, as its server names it) is required")?;
        if self.judge_concurrency == 0 {
            bail!("--judge-concurrency must be at least 1");
        }
        Ok(JudgeSettings {
            base_urls,
            model,
            api_key: self.api_key()?,
            concurrency: self.judge_concurrency,
            policy: self.policy()?,
            max_tokens: self.judge_max_tokens,
            response_format: self.judge_response_format.into(),
            rating_from: self.judge_rating_from.into(),
        })
    }

    /// The key is read from the environment and never printed; an explicitly
    /// named variable that is unset is an error, the default one
    /// (OPENAI_API_KEY) is optional.
    fn api_key(&self) -> Result<Option<Secret>> {
        Ok(match &self.judge_api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(Secret::new(k)),
                _ => bail!("--judge-api-key-env names {var}, but that environment variable is not set"),
            },
            None => std::env::var("OPENAI_API_KEY").ok().filter(|k| !k.is_empty()).map(Secret::new),
        })
    }

    fn policy(&self) -> Result<RetryPolicy> {
        let secs = |v: f64, name: &str, zero_ok: bool| -> Result<Duration> {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| zero_ok || !d.is_zero())
                .with_context(|| format!("{name} must be a positive number of seconds, got {v}"))
        };
        Ok(RetryPolicy {
            timeout: secs(self.judge_timeout, "--judge-timeout", false)?,
            max_retries: self.judge_max_retries,
            backoff_base: secs(self.judge_retry_backoff, "--judge-retry-backoff", true)?,
            ..RetryPolicy::default()
        })
    }
}
