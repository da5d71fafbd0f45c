//! The HTTP side: routes, the bearer-key check, one log line per request,
//! and the chat completions handler (check, tokenize, queue, answer).

use crate::api::{self, ApiError, ChatRequest, Choice, Usage};
use crate::constraint::{Constraint, Format, Grammars};
use crate::engine::{Event, Job, Stats, TokenLogprob};
use crate::ServeOptions;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dpo2d_model::generate::GenerationConfig;
use dpo2d_model::source::TextSide;
use futures_util::stream;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub struct AppState {
    opts: ServeOptions,
    text: Arc<TextSide>,
    /// The grammar compiler of structured outputs; `None` when the
    /// tokenizer's vocabulary cannot be read as bytes.
    grammars: Option<Grammars>,
    jobs: Sender<Job>,
    stats: Arc<Stats>,
    created: u64,
}

impl AppState {
    pub fn new(opts: ServeOptions, text: Arc<TextSide>, grammars: Option<Grammars>, jobs: Sender<Job>, stats: Arc<Stats>) -> Arc<Self> {
        Arc::new(AppState { opts, text, grammars, jobs, stats, created: now() })
    }

    /// OpenAI's `logprobs.content` entries of decoded tokens.
    fn logprob_entries(&self, lps: &[TokenLogprob]) -> Vec<Value> {
        let text = |id: u32| self.text.tokenizer.token_text(id);
        lps.iter()
            .map(|lp| {
                let mut e = api::token_entry(&text(lp.token), lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|&(id, l)| api::token_entry(&text(id), l)).collect();
                e
            })
            .collect()
    }
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .fallback(|| async { ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", "no such route") })
        .layer(DefaultBodyLimit::max(state.opts.limits.max_body_bytes))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What the log line of a request adds after its status, set by the handler.
#[derive(Clone)]
struct LogDetail(String);

/// The handler logs this request itself when it is done (a stream).
#[derive(Clone)]
struct LoggedLater;

async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    if resp.extensions().get::<LoggedLater>().is_none() {
        let detail = resp.extensions().get::<LogDetail>().map(|d| format!(" {}", d.0)).unwrap_or_default();
        tracing::info!("{method} {path} {} {:.2}s{detail}", resp.status().as_u16(), start.elapsed().as_secs_f64());
    }
    resp
}

async fn require_key(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.trim().as_bytes(), key.as_bytes())) {
            return ApiError::status(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "missing or wrong API key (Authorization: Bearer ...)",
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Liveness plus the decoder's counters.
async fn health(State(st): State<Shared>) -> Json<Value> {
    let s = &st.stats;
    Json(json!({
        "status": "ok",
        "pending": s.pending.load(Ordering::SeqCst),
        "batches": s.batches.load(Ordering::SeqCst),
        "rows": s.rows.load(Ordering::SeqCst),
    }))
}

async fn models(State(st): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": st.opts.model_name, "object": "model", "created": st.created, "owned_by": "dpo2d"}]}))
}

/// A checked request, ready for the decoder.
struct Prepared {
    prompt: Vec<u32>,
    cfg: GenerationConfig,
    constraint: Option<Constraint>,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
    prompt_text: String,
}

fn prepare(st: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Prepared, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body larger than {} bytes", st.opts.limits.max_body_bytes)
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError::status(status, "invalid_request_error", &msg)
    })?;
    let req: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(&format!("the body is not a valid chat completion request: {e}"), None))?;
    req.check_supported()?;
    let constraint = match req.format()? {
        Format::Text => None,
        Format::Json(schema) => {
            let g = st.grammars.as_ref().ok_or_else(|| {
                ApiError::invalid("response_format: this model's tokenizer does not support constrained decoding", Some("response_format"))
            })?;
            Some(g.matcher(&schema).map_err(|m| ApiError::invalid(&m, Some("response_format")))?)
        }
    };
    let messages = req.chat_messages()?;
    let lim = &st.opts.limits;
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(&format!("temperature must be in [0, 2], got {temperature}"), Some("temperature")));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(&format!("top_p must be in (0, 1], got {top_p}"), Some("top_p")));
    }
    let n = req.n.unwrap_or(1);
    if n == 0 || n > lim.max_n as u64 {
        return Err(ApiError::invalid(&format!("n must be between 1 and {}, got {n}", lim.max_n), Some("n")));
    }
    let stop = req.stop_strings();
    if stop.len() > 4 {
        return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
    }
    let prompt_text = st
        .text
        .chat
        .render(&messages, true)
        .map_err(|e| ApiError::invalid(&format!("cannot apply the chat template: {e:#}"), Some("messages")))?;
    let prompt = st
        .text
        .tokenizer
        .encode(&prompt_text, false)
        .map_err(|e| ApiError::invalid(&format!("cannot tokenize the prompt: {e:#}"), Some("messages")))?;
    let context = st.text.config.max_position_embeddings;
    if prompt.len() > lim.max_prompt_tokens || prompt.len() >= context {
        return Err(ApiError::invalid(
            &format!("the prompt has {} tokens; this server takes at most {}", prompt.len(), lim.max_prompt_tokens.min(context - 1)),
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    let max_new_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1", Some("max_tokens"))),
        Some(m) if m > lim.max_tokens as u64 => {
            return Err(ApiError::invalid(&format!("max_tokens is {m}; this server allows at most {}", lim.max_tokens), Some("max_tokens")))
        }
        Some(m) if prompt.len() + m as usize > context => {
            return Err(ApiError::invalid(
                &format!("prompt ({} tokens) + max_tokens ({m}) exceeds the model's context of {context} tokens", prompt.len()),
                Some("max_tokens"),
            )
            .with_code("context_length_exceeded"))
        }
        Some(m) => m as usize,
        None => lim.max_tokens.min(context - prompt.len()),
    };
    let seed = req.seed.map(|s| s as u64).unwrap_or_else(rand::random);
    let cfg = GenerationConfig {
        max_new_tokens,
        do_sample: temperature > 0.0,
        temperature,
        top_p,
        top_k: 0,
        seed,
        stop,
        num_return_sequences: n as usize,
        batch_size: n as usize,
    };
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    Ok(Prepared { prompt, cfg, constraint, logprobs: req.logprobs(), stream: req.stream, include_usage, prompt_text })
}

async fn chat_completions(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let p = match prepare(&st, body) {
        Ok(p) => p,
        Err(e) => return with_detail(e.clone().into_response(), format!("error: {}", e.message)),
    };
    if st.stats.pending.fetch_add(1, Ordering::SeqCst) >= st.opts.limits.max_queue {
        st.stats.pending.fetch_sub(1, Ordering::SeqCst);
        let mut r =
            ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "server_error", "too many requests queued; retry later").into_response();
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let (events, rx) = unbounded_channel();
    let id = format!("chatcmpl-{}", hex::encode(rand::random::<[u8; 12]>()));
    if st.opts.log_prompts {
        tracing::info!("{id} prompt: {:?}", p.prompt_text);
    }
    let n = p.cfg.num_return_sequences;
    let prompt_tokens = p.prompt.len();
    let want_logprobs = p.logprobs.is_some();
    let job = Job { prompt: p.prompt, cfg: p.cfg, stream: p.stream, constraint: p.constraint, logprobs: p.logprobs, events };
    if st.jobs.send(job).is_err() {
        st.stats.pending.fetch_sub(1, Ordering::SeqCst);
        return ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down").into_response();
    }
    let reply = Reply { st: st.clone(), id, created: now(), n, prompt_tokens, logprobs: want_logprobs, start: Instant::now() };
    if p.stream {
        reply.stream(rx, p.include_usage)
    } else {
        reply.whole(rx).await
    }
}

fn with_detail(mut r: Response, detail: String) -> Response {
    r.extensions_mut().insert(LogDetail(detail));
    r
}

/// The answer to one queued request.
struct Reply {
    st: Shared,
    id: String,
    created: u64,
    n: usize,
    prompt_tokens: usize,
    /// The answer carries log-probabilities.
    logprobs: bool,
    start: Instant,
}

impl Reply {
    fn usage(&self, completion_tokens: usize) -> Usage {
        Usage { prompt_tokens: self.prompt_tokens, completion_tokens, total_tokens: self.prompt_tokens + completion_tokens }
    }

    fn summary(&self, usage: Usage, finish: &[&str]) -> String {
        format!(
            "{} n={} prompt_tokens={} completion_tokens={} finish={}",
            self.id,
            self.n,
            usage.prompt_tokens,
            usage.completion_tokens,
            finish.join(",")
        )
    }

    async fn whole(self, mut rx: UnboundedReceiver<Event>) -> Response {
        let mut choices: Vec<Option<Choice>> = vec![None; self.n];
        let mut tokens = 0;
        while choices.iter().any(Option::is_none) {
            match rx.recv().await {
                Some(Event::Delta { .. }) => {}
                Some(Event::Done { index, text, finish, tokens: t, logprobs }) => {
                    tokens += t;
                    let logprobs = self.logprobs.then(|| api::logprobs_object(self.st.logprob_entries(&logprobs)));
                    choices[index] = Some(Choice { text, finish, logprobs });
                }
                Some(Event::Failed(msg)) => {
                    return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &msg).into_response()
                }
                None => return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the decoder stopped").into_response(),
            }
        }
        let choices: Vec<Choice> = choices.into_iter().flatten().collect();
        let usage = self.usage(tokens);
        if self.st.opts.log_prompts {
            for c in &choices {
                tracing::info!("{} answer: {:?}", self.id, c.text);
            }
        }
        let finish: Vec<&str> = choices.iter().map(|c| api::finish_reason(c.finish)).collect();
        let detail = self.summary(usage, &finish);
        let body = api::completion_body(&self.id, self.created, &self.st.opts.model_name, &choices, usage);
        with_detail(Json(body).into_response(), detail)
    }

    /// Server-sent events: a role chunk per choice, content chunks as text
    /// is decoded, a finish chunk per choice, the usage chunk if asked, `[DONE]`.
    fn stream(self, rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
        let model = self.st.opts.model_name.clone();
        let mut first: Vec<SseEvent> = (0..self.n)
            .map(|i| sse(api::chunk_body(&self.id, self.created, &model, i, json!({"role": "assistant", "content": ""}), None, None)))
            .collect();
        first.reverse();
        let state = StreamState { reply: self, rx, model, queued: first, open: 0, tokens: 0, finish: vec![], include_usage, done: false };
        let body = stream::unfold(state, |mut s| async move { s.next().await.map(|e| (Ok::<_, Infallible>(e), s)) });
        let mut r = Sse::new(body).into_response();
        r.extensions_mut().insert(LoggedLater);
        r
    }
}

fn sse(v: Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

struct StreamState {
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    model: String,
    /// Events to send before reading more (last first).
    queued: Vec<SseEvent>,
    /// Choices finished so far.
    open: usize,
    tokens: usize,
    finish: Vec<&'static str>,
    include_usage: bool,
    done: bool,
}

impl StreamState {
    async fn next(&mut self) -> Option<SseEvent> {
        if let Some(e) = self.queued.pop() {
            return Some(e);
        }
        if self.done {
            return None;
        }
        let r = &self.reply;
        match self.rx.recv().await {
            Some(Event::Delta { index, text, logprobs }) => {
                let logprobs = r.logprobs.then(|| api::logprobs_object(r.st.logprob_entries(&logprobs)));
                Some(sse(api::chunk_body(&r.id, r.created, &self.model, index, json!({"content": text}), logprobs, None)))
            }
            Some(Event::Done { index, finish, tokens, logprobs, .. }) => {
                self.open += 1;
                self.tokens += tokens;
                self.finish.push(api::finish_reason(finish));
                let logprobs = (r.logprobs && !logprobs.is_empty()).then(|| api::logprobs_object(r.st.logprob_entries(&logprobs)));
                let mut out = vec![sse(api::chunk_body(&r.id, r.created, &self.model, index, json!({}), logprobs, Some(finish)))];
                if self.open == r.n {
                    let usage = r.usage(self.tokens);
                    if self.include_usage {
                        out.push(sse(api::usage_chunk(&r.id, r.created, &self.model, usage)));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    self.done = true;
                    tracing::info!(
                        "POST /v1/chat/completions 200 {:.2}s stream {}",
                        r.start.elapsed().as_secs_f64(),
                        r.summary(usage, &self.finish)
                    );
                }
                out.reverse();
                self.queued = out;
                self.queued.pop()
            }
            Some(Event::Failed(msg)) => {
                self.done = true;
                tracing::info!("POST /v1/chat/completions 200 stream {} failed: {msg}", r.id);
                Some(sse(json!({"error": {"message": msg, "type": "server_error", "param": null, "code": null}})))
            }
            None => {
                self.done = true;
                None
            }
        }
    }
}
