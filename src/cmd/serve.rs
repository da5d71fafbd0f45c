//! `dpo2d serve`: an OpenAI-compatible chat completions server over a model.

use anyhow::{bail, Context, Result};
use dpo2d_serve::{Limits, ServeOptions};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name that /v1/models lists and answers carry [default: --model].
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` with the key held in this environment variable [default: no key].
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// Rows (requests x n) decoded together in one batch.
    #[arg(long, default_value_t = ServeOptions::default().max_batch_rows)]
    pub max_batch_size: usize,
    /// GiB of memory the decoding rows' keys and values may take (prompt + max_tokens positions a row); requests beyond it wait.
    #[arg(long, default_value_t = ServeOptions::default().kv_cache_bytes >> 30)]
    pub kv_cache_gib: u64,
    /// Milliseconds a batch waits for more requests before it starts.
    #[arg(long, default_value_t = ServeOptions::default().batch_wait.as_millis() as u64)]
    pub batch_wait_ms: u64,
    /// Largest `max_tokens` a request may ask for (also the default).
    #[arg(long, default_value_t = Limits::default().max_tokens)]
    pub max_tokens_limit: usize,
    /// Longest prompt in tokens [default: the model's context].
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Largest `n` (choices per request).
    #[arg(long, default_value_t = Limits::default().max_n)]
    pub max_n: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Requests waiting or decoding beyond which new ones are refused with 503.
    #[arg(long, default_value_t = Limits::default().max_queue)]
    pub max_queue: usize,
}

/// `log_prompts`: -v on the command line also logs prompt and answer texts.
pub fn run(a: Args, log_prompts: bool) -> Result<()> {
    let api_key = match &a.api_key_env {
        Some(var) => {
            let k = std::env::var(var).with_context(|| format!("--api-key-env {var}: the environment variable is not set"))?;
            if k.trim().is_empty() {
                bail!("--api-key-env {var}: the environment variable is empty");
            }
            Some(k.trim().to_string())
        }
        None => None,
    };
    let lm = a.model.load()?;
    let context = lm.config.max_position_embeddings;
    let opts = ServeOptions {
        host: a.host.clone(),
        port: a.port,
        model_name: a.served_model_name.clone().unwrap_or_else(|| a.model.model.clone()),
        api_key,
        limits: Limits {
            max_body_bytes: a.max_body_bytes,
            max_prompt_tokens: a.max_prompt_tokens.unwrap_or(context),
            max_tokens: a.max_tokens_limit,
            max_n: a.max_n,
            max_queue: a.max_queue,
        },
        max_batch_rows: a.max_batch_size,
        kv_cache_bytes: a.kv_cache_gib << 30,
        batch_wait: Duration::from_millis(a.batch_wait_ms),
        log_prompts,
    };
    let name = opts.model_name.clone();
    dpo2d_serve::serve(lm, opts, shutdown_signal(), |addr| {
        eprintln!("serving {name} at http://{addr}/v1 (Ctrl-C to stop)");
    })
}

/// The first Ctrl-C (or SIGTERM) stops accepting and lets the requests in
/// flight finish; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    eprintln!("stopping: finishing the requests in flight (Ctrl-C again to quit now)");
    tokio::spawn(async {
        wait_for_signal().await;
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
