//! `dpo2d serve`: an OpenAI-compatible HTTP server (chat completions,
//! streamed or not; the model list; a health check) over any model dpo2d
//! loads, so that judges, chat UIs and evaluation harnesses can talk to a
//! trained policy. Requests are checked and tokenized on the HTTP side, then
//! decoded together in batches by one [`engine::Engine`] that owns the model.

pub mod api;
pub mod constraint;
pub mod engine;
mod routes;

use anyhow::{Context, Result};
use dpo2d_model::source::LoadedModel;
use engine::Engine;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What a request may ask for; beyond these it gets a 4xx answer.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Longest prompt (after the chat template), in tokens.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for (and the default when it asks for none).
    pub max_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Requests queued or decoding beyond which new ones get 503.
    pub max_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body_bytes: 4 << 20, max_prompt_tokens: 8192, max_tokens: 2048, max_n: 8, max_queue: 256 }
    }
}

/// Rows decoded together by default: every step reads all the weights, and
/// more rows share each read (in the load test of docs/evaluation.md, 64
/// rows gave about 1.3 times the tokens/s of 16 on two CPU cores).
const DEFAULT_MAX_BATCH_ROWS: usize = 64;
/// GiB the rows' keys and values may take by default: SmolLM2-135M in f32
/// keeps 45 KiB per position, so 64 rows of about 1,450 positions.
const DEFAULT_KV_CACHE_GIB: u64 = 4;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// The name `/v1/models` lists and answers carry.
    pub model_name: String,
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub limits: Limits,
    /// Rows (requests x `n`) decoded together.
    pub max_batch_rows: usize,
    /// Memory the keys and values of the rows in flight may take, about:
    /// a request waits while its rows (prompt + `max_tokens` positions
    /// each) would not fit beside the others.
    pub kv_cache_bytes: u64,
    /// How long a batch waits for more requests before it starts.
    pub batch_wait: Duration,
    /// Log the prompt and answer text of every request.
    pub log_prompts: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8000,
            model_name: "dpo2d".into(),
            api_key: None,
            limits: Limits::default(),
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            kv_cache_bytes: DEFAULT_KV_CACHE_GIB << 30,
            batch_wait: Duration::from_millis(5),
            log_prompts: false,
        }
    }
}

/// Serves until `shutdown` completes, then finishes the requests in flight
/// and returns. The model decodes on the calling thread; `on_ready` gets the
/// bound address (port 0 picks a free one).
pub fn serve(
    lm: LoadedModel,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let text = Arc::new(lm.text());
    let stats = Arc::new(engine::Stats::default());
    let eos = text.stop_token_ids();
    let grammars = match constraint::Grammars::new(&text, &eos, lm.model.config().vocab_size) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!("structured outputs are off for this model: {e:#}");
            None
        }
    };
    let model = lm.model.for_decoding()?;
    let kv_positions = (opts.kv_cache_bytes / model.kv_bytes_per_position().max(1) as u64) as usize;
    let engine = Engine {
        model,
        eos,
        text: text.clone(),
        max_batch_rows: opts.max_batch_rows.max(opts.limits.max_n).max(1),
        kv_positions,
        batch_wait: opts.batch_wait,
        stats: stats.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dpo2d-serve-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)))
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    let addr = listener.local_addr()?;
    let (jobs, queue) = std::sync::mpsc::channel();
    let app = routes::router(routes::AppState::new(opts, text, grammars, jobs, stats));
    let server = rt.spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await });
    on_ready(addr);
    // Returns once the server has stopped and dropped its end of the queue.
    engine.run(queue);
    rt.block_on(server).context("the HTTP server stopped unexpectedly")?.context("the HTTP server failed")?;
    Ok(())
}

/// A server running on a thread of its own (for tests and embedding).
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// `http://ADDR/v1`, the base URL OpenAI clients take.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Stops accepting, finishes what is in flight, and waits for the server.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Starts [`serve`] on a new thread and waits until it listens.
pub fn spawn(lm: LoadedModel, opts: ServeOptions) -> Result<Running> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, addr) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name("dpo2d-serve".into()).spawn(move || {
        serve(
            lm,
            opts,
            async move {
                let _ = stopped.await;
            },
            |a| {
                let _ = ready.send(a);
            },
        )
    })?;
    match addr.recv() {
        Ok(addr) => Ok(Running { addr, stop: Some(stop), thread: Some(thread) }),
        Err(_) => Err(thread
            .join()
            .map_err(|_| anyhow::anyhow!("the server thread panicked"))?
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("the server did not start"))),
    }
}
