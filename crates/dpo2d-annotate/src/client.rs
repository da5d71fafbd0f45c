//! A minimal OpenAI-compatible chat-completions client with the retry
//! policy an annotation run over thousands of requests needs: per-request
//! timeout, exponential backoff with jitter, `Retry-After` on 429/503, and
//! retries on 5xx, timeouts and connection errors, a retry after a timeout
//! at a slightly higher temperature (so a judge that looped can answer
//! differently), and an adaptive bound on requests in flight ([`Window`]).
//! The API key is held in a [`Secret`] and scrubbed, with any fragment of
//! it, from every error message.

use crate::expectation::TokenChoice;
use crate::prompt::ChatRequest;
use rand::Rng;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An API key. `Debug`/`Display` never show it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// Replaces every fragment of the key of [`MIN_FRAGMENT`] or more bytes
    /// (the whole key if it is shorter) with `***`, so that a server that
    /// echoes the key cannot leak a prefix of it through a cut snippet.
    /// Must run before any text is cut.
    pub fn redact(&self, text: &str) -> String {
        let key = self.0.as_bytes();
        if key.is_empty() {
            return text.to_string();
        }
        let min = MIN_FRAGMENT.min(key.len());
        let bytes = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let (mut i, mut copied) = (0, 0);
        while i + min <= bytes.len() {
            let longest = (0..key.len()).map(|j| common_prefix(&bytes[i..], &key[j..])).max().unwrap_or(0);
            if longest < min {
                i += 1;
                continue;
            }
            // Widen to character boundaries: a key with multi-byte characters
            // may match from the middle of one.
            let (mut start, mut end) = (i, i + longest);
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let start = start.max(copied);
            out.push_str(&text[copied..start]);
            out.push_str("***");
            copied = end;
            i = end;
        }
        out.push_str(&text[copied..]);
        out
    }
}

/// The shortest piece of a key that [`Secret::redact`] removes.
pub const MIN_FRAGMENT: usize = 8;

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
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
    /// Failed attempts by reason, indexed by [`Reason`].
    pub by_reason: [AtomicU64; Reason::ALL.len()],
}

impl ClientStats {
    pub fn failures(&self, r: Reason) -> u64 {
        self.by_reason[r as usize].load(Ordering::Relaxed)
    }
}

/// Why an attempt failed, for the progress line and the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Timeout,
    /// 429 or 503: the server asked to slow down.
    RateLimited,
    /// Other 5xx answers.
    ServerError,
    /// Could not connect at all.
    Unreachable,
    /// The connection failed or was cut mid-answer.
    Connection,
    /// A 200 whose body is not a usable chat completion.
    BadBody,
    /// A 4xx other than the ones that stop the run.
    Rejected,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Timeout,
        Reason::RateLimited,
        Reason::ServerError,
        Reason::Unreachable,
        Reason::Connection,
        Reason::BadBody,
        Reason::Rejected,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Timeout => "timeout",
            Reason::RateLimited => "rate-limited",
            Reason::ServerError => "server error",
            Reason::Unreachable => "unreachable",
            Reason::Connection => "connection",
            Reason::BadBody => "bad body",
            Reason::Rejected => "rejected",
        }
    }
}

/// A successful completion.
#[derive(Debug, Clone)]
pub struct Completion {
    pub content: String,
    /// `length` when the answer was cut at `max_tokens`.
    pub finish_reason: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The answer's tokens with their log-probabilities, when the request
    /// asked for them and the server returned them.
    pub logprobs: Vec<TokenChoice>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// Gave up after retries, or a non-retryable answer for this request.
    #[error("{0}")]
    Request(String),
    /// The server refuses every request (bad key, wrong URL or model): stop the run.
    #[error("{0}")]
    Fatal(String),
    /// The server does not take the request's `response_format`.
    #[error("{0}")]
    FormatRejected(String),
}

/// A judge client over one server or a fleet of them. Each request goes to
/// the server with the fewest requests in flight; each server has its own
/// adaptive bound ([`Window`]) and counters; a server that keeps failing is
/// set aside for a while ([`SET_ASIDE_AFTER`]) and the others carry on.
pub struct ChatClient {
    http: reqwest::Client,
    servers: Vec<Server>,
    key: Option<Secret>,
    pub policy: RetryPolicy,
    /// Totals over the fleet.
    pub stats: Arc<ClientStats>,
    /// Told whenever a slot frees up or a bound widens, on any server.
    changed: Arc<tokio::sync::Notify>,
}

/// One server of a fleet.
pub struct Server {
    url: String,
    window: Window,
    stats: ClientStats,
    health: Mutex<Health>,
    /// A request with `response_format` has been answered: from now on a
    /// bare 400 is about the request, not about the field.
    format_accepted: AtomicBool,
    /// The server rejected `response_format`: later requests that carry it
    /// are refused here, without asking the server again.
    format_rejected: AtomicBool,
}

#[derive(Debug, Default)]
struct Health {
    failures_in_row: u32,
    set_aside_until: Option<Instant>,
    times_set_aside: u64,
}

impl Health {
    fn set_aside(&self, now: Instant) -> bool {
        self.set_aside_until.is_some_and(|t| t > now)
    }
}

/// Failed attempts in a row (timeouts, refused or cut connections, 5xx) after
/// which a server is set aside; it is tried again, one request at a time,
/// after a pause that doubles each time it is set aside.
pub const SET_ASIDE_AFTER: u32 = 3;

/// One server's share of a run, for the progress line and the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerReport {
    pub url: String,
    /// HTTP requests sent (retries included).
    pub requests: u64,
    pub answered: u64,
    pub failed_attempts: u64,
    pub times_set_aside: u64,
    /// Set aside right now.
    pub down: bool,
    pub in_flight: usize,
    /// The current bound on requests in flight.
    pub bound: usize,
}

/// The fleet in a few words for the progress line: `8000:3/8 8001:down 8002:1/8`
/// (each server by its port, or its host, then in flight / bound).
pub fn fleet_line(servers: &[ServerReport]) -> String {
    servers
        .iter()
        .map(|r| {
            let host = r.url.split("://").nth(1).unwrap_or(&r.url).split('/').next().unwrap_or("");
            let name = host.rsplit_once(':').map(|(_, port)| port).unwrap_or(host);
            if r.down {
                format!("{name}:down")
            } else {
                format!("{name}:{}/{}", r.in_flight, r.bound)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Server {
    fn new(base_url: &str, concurrency: usize, changed: Arc<tokio::sync::Notify>) -> Self {
        Server {
            url: endpoint(base_url),
            window: Window::shared(concurrency, changed),
            stats: ClientStats::default(),
            health: Mutex::new(Health::default()),
            format_accepted: AtomicBool::new(false),
            format_rejected: AtomicBool::new(false),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot unless the server is set aside; a server back from being
    /// set aside gets one request at a time until it answers. With
    /// `fleet_down` (every server set aside) nothing is held back: each
    /// request then waits out its own backoff, as with one server.
    fn try_acquire(&self, now: Instant, fleet_down: bool) -> Option<Slot<'_>> {
        if fleet_down {
            return self.window.try_acquire();
        }
        if !self.available(now) {
            return None;
        }
        let probing = self.health().failures_in_row >= SET_ASIDE_AFTER;
        if probing && self.window.in_flight() > 0 {
            return None;
        }
        self.window.try_acquire()
    }

    fn available(&self, now: Instant) -> bool {
        !self.health().set_aside(now)
    }

    fn on_success(&self) {
        let mut h = self.health();
        if h.failures_in_row >= SET_ASIDE_AFTER {
            tracing::info!("{} answers again", self.url);
        }
        h.failures_in_row = 0;
        h.set_aside_until = None;
    }

    /// A failed attempt that says something about the server's health.
    fn on_failure(&self, policy: &RetryPolicy) {
        let mut h = self.health();
        h.failures_in_row += 1;
        if h.failures_in_row >= SET_ASIDE_AFTER {
            let pause = policy
                .backoff_base
                .max(Duration::from_millis(10))
                .saturating_mul(4u32 << h.times_set_aside.min(10) as u32)
                .min(policy.max_backoff);
            h.set_aside_until = Some(Instant::now() + pause);
            h.times_set_aside += 1;
            tracing::warn!("{} failed {} times in a row: set aside for {:.1} s", self.url, h.failures_in_row, pause.as_secs_f64());
        }
    }

    fn report(&self, now: Instant) -> ServerReport {
        let h = self.health();
        let s = &self.stats;
        ServerReport {
            url: self.url.trim_end_matches("/chat/completions").to_string(),
            requests: s.requests.load(Ordering::Relaxed),
            answered: s.successes.load(Ordering::Relaxed),
            failed_attempts: Reason::ALL.iter().map(|&r| s.failures(r)).sum(),
            times_set_aside: h.times_set_aside,
            down: h.set_aside(now),
            in_flight: self.window.in_flight(),
            bound: self.window.bound().0,
        }
    }
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
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<WireLogprobs>,
}

/// OpenAI's `logprobs` object of a choice.
#[derive(Deserialize)]
struct WireLogprobs {
    #[serde(default)]
    content: Option<Vec<WireToken>>,
}

#[derive(Deserialize)]
struct WireToken {
    token: String,
    logprob: f64,
    #[serde(default)]
    top_logprobs: Vec<WireTop>,
}

#[derive(Deserialize)]
struct WireTop {
    token: String,
    logprob: f64,
}

impl WireLogprobs {
    fn tokens(self) -> Vec<TokenChoice> {
        self.content
            .unwrap_or_default()
            .into_iter()
            .map(|t| TokenChoice {
                token: t.token,
                logprob: t.logprob,
                top: t.top_logprobs.into_iter().map(|x| (x.token, x.logprob)).collect(),
            })
            .collect()
    }
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
    /// Retry, after the server's requested delay if it gave one.
    Retry {
        msg: String,
        after: Option<Duration>,
        reason: Reason,
    },
    Fail(String),
    Fatal(String),
    FormatRejected(String),
}

/// How much a retry after a timeout raises the temperature (up to 1), so a
/// judge that looped at temperature 0 does not loop the same way again.
pub const RETRY_TEMPERATURE_STEP: f32 = 0.2;

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
    /// A client over the servers at `base_urls` (one or more), with at most
    /// `concurrency` requests in flight on each; timeouts may lower a server's bound for a while.
    pub fn new(base_urls: &[String], key: Option<Secret>, policy: RetryPolicy, concurrency: usize) -> anyhow::Result<Self> {
        if base_urls.is_empty() {
            anyhow::bail!("no judge server given");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(policy.timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot create the HTTP client: {e}"))?;
        let changed = Arc::new(tokio::sync::Notify::new());
        let servers = base_urls.iter().map(|u| Server::new(u, concurrency, changed.clone())).collect();
        Ok(ChatClient { http, servers, key, policy, stats: Arc::new(ClientStats::default()), changed })
    }

    /// The first server's endpoint.
    pub fn url(&self) -> &str {
        &self.servers[0].url
    }

    /// Each server's share of the run so far.
    pub fn servers(&self) -> Vec<ServerReport> {
        let now = Instant::now();
        self.servers.iter().map(|s| s.report(now)).collect()
    }

    /// (current bound, most allowed) on requests in flight, over the fleet.
    pub fn bound(&self) -> (usize, usize) {
        self.servers.iter().map(|s| s.window.bound()).fold((0, 0), |(a, b), (x, y)| (a + x, b + y))
    }

    /// (times a bound was lowered, lowest bound a server reached).
    pub fn decreases(&self) -> (u64, usize) {
        let d: Vec<(u64, usize)> = self.servers.iter().map(|s| s.window.decreases()).collect();
        (d.iter().map(|x| x.0).sum(), d.iter().map(|x| x.1).min().unwrap_or(0))
    }

    /// Removes the key, and any fragment of it, from text that might be shown or stored.
    pub fn redact(&self, s: &str) -> String {
        match &self.key {
            Some(k) => k.redact(s),
            None => s.to_string(),
        }
    }

    /// Sends `req`, retrying per policy, each attempt on the server with the
    /// fewest requests in flight (another one than the last where there is
    /// one; then without waiting). A retry after a timeout or a cut-off
    /// answer goes out at a higher temperature; the others resend the same body.
    pub async fn complete(&self, req: &ChatRequest) -> Result<Completion, ChatError> {
        let mut attempt = 0u32;
        let mut free_retries = 0;
        let mut last = None;
        let mut req = req.clone();
        loop {
            let body = serde_json::to_string(&req).expect("a chat request always serialises");
            let (i, outcome) = self.attempt(&body, req.response_format.is_some(), last).await;
            let (msg, after, reason) = match outcome {
                Attempt::Done(c) => {
                    for st in [&*self.stats, &self.servers[i].stats] {
                        st.successes.fetch_add(1, Ordering::Relaxed);
                        st.prompt_tokens.fetch_add(c.prompt_tokens, Ordering::Relaxed);
                        st.completion_tokens.fetch_add(c.completion_tokens, Ordering::Relaxed);
                    }
                    self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                    return Ok(c);
                }
                Attempt::Fail(msg) => return Err(ChatError::Request(self.redact(&msg))),
                Attempt::Fatal(msg) => return Err(ChatError::Fatal(self.redact(&self.naming(i, msg)))),
                Attempt::FormatRejected(msg) => return Err(ChatError::FormatRejected(self.redact(&msg))),
                Attempt::Retry { msg, after, reason } => (msg, after, reason),
            };
            let elsewhere = (0..self.servers.len()).any(|j| j != i && self.servers[j].available(Instant::now()));
            // A refused connection or a 429 says something about that server,
            // not about the request: with another server to go to, it does
            // not use up the request's retries (up to twice per server).
            if elsewhere && matches!(reason, Reason::Unreachable | Reason::RateLimited) && free_retries < 2 * self.servers.len() {
                free_retries += 1;
                last = Some(i);
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if attempt >= self.policy.max_retries {
                return Err(self.give_up(&self.naming(i, msg), attempt, reason));
            }
            last = Some(i);
            if !elsewhere {
                let delay = match after {
                    Some(d) => d.min(self.policy.max_retry_after),
                    None => self.backoff(attempt),
                };
                tracing::debug!("request failed ({}), retrying in {delay:?}", self.redact(&msg));
                self.stats.retrying_now.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                self.stats.retrying_now.fetch_sub(1, Ordering::Relaxed);
            }
            if matches!(reason, Reason::Timeout | Reason::Connection | Reason::BadBody) {
                // The same body would likely get the same runaway or cut-off answer.
                req.temperature = (req.temperature + RETRY_TEMPERATURE_STEP).min(1.0);
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
        }
    }

    /// A message about server `i`, naming it when there are several.
    fn naming(&self, i: usize, msg: String) -> String {
        if self.servers.len() > 1 {
            format!("{}: {msg}", self.servers[i].url)
        } else {
            msg
        }
    }

    /// The error after the last retry; fatal when no server was ever
    /// reached or too many requests in a row gave up.
    fn give_up(&self, msg: &str, attempt: u32, reason: Reason) -> ChatError {
        let msg = format!("gave up after {} attempts: {msg}", attempt + 1);
        let in_a_row = self.stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if reason == Reason::Unreachable && self.stats.successes.load(Ordering::Relaxed) == 0 {
            let which = if self.servers.len() > 1 {
                "are the servers running, and are the --base-url values right?"
            } else {
                "is the server running, and is --base-url right?"
            };
            return ChatError::Fatal(self.redact(&format!("{msg} ({which})")));
        }
        if in_a_row >= self.policy.max_consecutive_failures.max(1) {
            let what = if self.servers.len() > 1 { "every server seems to be down" } else { "the server seems to be down" };
            return ChatError::Fatal(self.redact(&format!("{in_a_row} requests in a row failed, {what}; last error: {msg}")));
        }
        ChatError::Request(self.redact(&msg))
    }

    /// Exponential backoff with "equal jitter": half fixed, half random.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.policy.backoff_base.saturating_mul(1u32 << attempt.min(20));
        let capped = exp.min(self.policy.max_backoff);
        let half = capped / 2;
        let jitter = rand::thread_rng().gen_range(0.0..=1.0);
        half + half.mul_f64(jitter)
    }

    /// A slot on the server with the fewest requests in flight, another one
    /// than `avoid` where that has room, skipping servers set aside while
    /// any other is not; waits while every server is full.
    async fn acquire(&self, avoid: Option<usize>) -> (usize, Slot<'_>) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let fleet_down = !self.servers.iter().any(|s| s.available(now));
            let mut order: Vec<usize> = (0..self.servers.len()).collect();
            order.sort_by_key(|&i| (Some(i) == avoid, self.servers[i].window.in_flight()));
            for i in order {
                if let Some(slot) = self.servers[i].try_acquire(now, fleet_down) {
                    return (i, slot);
                }
            }
            // Wake when a slot frees up, or when the first server set aside may be tried again.
            let back = self.servers.iter().filter_map(|s| s.health().set_aside_until).filter(|&t| t > now).min();
            match back {
                Some(t) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep_until(t.into()) => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// One HTTP exchange on the server the fleet picks, holding a slot of
    /// its window for its duration; returns the server's index too.
    async fn attempt(&self, body: &str, structured: bool, avoid: Option<usize>) -> (usize, Attempt) {
        let (i, slot) = self.acquire(avoid).await;
        let server = &self.servers[i];
        if structured && server.format_rejected.load(Ordering::SeqCst) {
            return (i, Attempt::FormatRejected("the server rejected response_format earlier in this run".into()));
        }
        let outcome = self.exchange(server, body, structured).await;
        // Before the slot is given back, so the next request in it sees the flag.
        if let Attempt::FormatRejected(_) = &outcome {
            server.format_rejected.store(true, Ordering::SeqCst);
        }
        match &outcome {
            Attempt::Done(_) => {
                server.window.on_success();
                server.on_success();
            }
            Attempt::Retry { reason: Reason::Timeout | Reason::RateLimited, .. } if server.stats.successes.load(Ordering::Relaxed) > 0 => {
                if let Some((from, to)) = server.window.on_timeout(&slot) {
                    tracing::warn!(
                        "{}: requests time out or are turned away while others succeed: at most {to} request(s) in flight there from now on (was {from}); \
                         the server may have fewer parallel slots than --concurrency, or be overloaded",
                        server.url
                    );
                }
            }
            _ => {}
        }
        if let Attempt::Retry {
            reason: Reason::Timeout | Reason::ServerError | Reason::Unreachable | Reason::Connection | Reason::BadBody,
            ..
        } = &outcome
        {
            server.on_failure(&self.policy);
        }
        drop(slot);
        let reason = match &outcome {
            Attempt::Retry { reason, .. } => Some(*reason),
            Attempt::Fail(_) | Attempt::FormatRejected(_) => Some(Reason::Rejected),
            _ => None,
        };
        if let Some(r) = reason {
            for st in [&*self.stats, &server.stats] {
                st.by_reason[r as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
        (i, outcome)
    }

    async fn exchange(&self, server: &Server, body: &str, structured: bool) -> Attempt {
        for st in [&*self.stats, &server.stats] {
            st.requests.fetch_add(1, Ordering::Relaxed);
        }
        let url = &server.url;
        let mut req = self
            .http
            .post(url)
            .timeout(self.policy.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(k) = &self.key {
            req = req.bearer_auth(k.expose());
        }
        let retry = |msg: String, reason: Reason| Attempt::Retry { msg, after: None, reason };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return retry(format!("no answer within {:?}", self.policy.timeout), Reason::Timeout),
            Err(e) => {
                let reason = if e.is_connect() { Reason::Unreachable } else { Reason::Connection };
                return retry(format!("cannot reach {url}: {}", error_chain(&e)), reason);
            }
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
            Err(e) if e.is_timeout() => return retry(format!("answer not complete within {:?}", self.policy.timeout), Reason::Timeout),
            Err(e) => return retry(format!("answer cut off: {}", error_chain(&e)), Reason::Connection),
        };
        // Redact before cutting: a cut can split the key and leave a prefix that no longer matches it whole.
        let snippet: String = self.redact(&text).chars().take(300).collect();
        if status.is_success() {
            return match read_completion(&text) {
                Ok(c) => {
                    if structured {
                        server.format_accepted.store(true, Ordering::Relaxed);
                    }
                    Attempt::Done(c)
                }
                // A 200 whose body is not a complete completion object: a
                // proxy hiccup or a cut connection, worth another try.
                Err(e) => retry(format!("{e}: {snippet}"), Reason::BadBody),
            };
        }
        let code = status.as_u16();
        let msg = format!("server answered {status}: {snippet}");
        match code {
            429 | 503 => Attempt::Retry { msg, after: retry_after, reason: Reason::RateLimited },
            408 | 409 | 425 => retry(msg, Reason::ServerError),
            500..=599 => retry(msg, Reason::ServerError),
            400..=499 if structured && rejects_format(server, code, &text) => Attempt::FormatRejected(msg),
            401 | 403 => Attempt::Fatal(format!("{msg} (check the API key: --judge-api-key-env names the variable that holds it)")),
            404 | 405 => Attempt::Fatal(format!("{msg} (check --base-url, which should end in /v1, and --model)")),
            _ => Attempt::Fail(msg),
        }
    }
}

/// Whether a 4xx answer to a request with `response_format` is about that
/// field: the server names it, or answers a bare 400 before it ever
/// accepted the field.
fn rejects_format(server: &Server, code: u16, text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    let names_it = ["response_format", "json_schema", "json schema", "response format"].iter().any(|w| lower.contains(w));
    names_it || (code == 400 && !server.format_accepted.load(Ordering::Relaxed))
}

/// A chat-completion body (what the server answers, or a Batch API result
/// line's `response.body`) as a [`Completion`].
pub fn read_completion(text: &str) -> Result<Completion, String> {
    let w = serde_json::from_str::<WireResponse>(text).map_err(|e| format!("the answer is not a chat completion ({e})"))?;
    let (p, c) = w.usage.map(|u| (u.prompt_tokens, u.completion_tokens)).unwrap_or((0, 0));
    match w.choices.into_iter().next() {
        Some(WireChoice { message: WireMessage { content: Some(content) }, finish_reason, logprobs }) => {
            let logprobs = logprobs.map(WireLogprobs::tokens).unwrap_or_default();
            Ok(Completion { content, finish_reason, prompt_tokens: p, completion_tokens: c, logprobs })
        }
        _ => Err("the answer has no message content".into()),
    }
}

/// An adaptive bound on requests in flight (AIMD, as TCP's congestion
/// window): a timeout while other requests succeed means requests queue on
/// the server beyond its parallel slots, so the bound is halved, at most
/// once per round of requests (the timeouts of one burst count once); every
/// bound's worth of answers widens it by one again, up to the configured
/// concurrency.
pub struct Window {
    max: usize,
    state: Mutex<WindowState>,
    changed: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Clone, Copy)]
struct WindowState {
    limit: usize,
    in_flight: usize,
    /// Bumped on every decrease; a slot taken before it cannot decrease again.
    epoch: u64,
    answered: usize,
    decreases: u64,
    lowest: usize,
}

/// A place in the window, given back on drop.
pub struct Slot<'a> {
    window: &'a Window,
    epoch: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.window.lock().in_flight -= 1;
        self.window.changed.notify_waiters();
    }
}

impl Window {
    /// A window that tells `changed` when a slot frees up or the bound widens
    /// (a fleet's windows share one, so a request can wait on all of them).
    pub fn shared(max: usize, changed: Arc<tokio::sync::Notify>) -> Self {
        let max = max.max(1);
        let state = WindowState { limit: max, in_flight: 0, epoch: 0, answered: 0, decreases: 0, lowest: max };
        Window { max, state: Mutex::new(state), changed }
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> Option<Slot<'_>> {
        let mut s = self.lock();
        (s.in_flight < s.limit).then(|| {
            s.in_flight += 1;
            Slot { window: self, epoch: s.epoch }
        })
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn on_success(&self) {
        let mut s = self.lock();
        s.answered += 1;
        if s.answered >= s.limit && s.limit < self.max {
            s.limit += 1;
            s.answered = 0;
            drop(s);
            self.changed.notify_waiters();
        }
    }

    /// A request in `slot` timed out or was turned away (429/503): halves the bound unless it was already
    /// lowered since the slot was taken. Returns (old, new) when it changed.
    fn on_timeout(&self, slot: &Slot<'_>) -> Option<(usize, usize)> {
        let mut s = self.lock();
        if slot.epoch != s.epoch || s.limit == 1 {
            return None;
        }
        let from = s.limit;
        s.limit = (s.limit / 2).max(1);
        s.lowest = s.lowest.min(s.limit);
        s.epoch += 1;
        s.answered = 0;
        s.decreases += 1;
        Some((from, s.limit))
    }

    /// (current bound, most allowed).
    pub fn bound(&self) -> (usize, usize) {
        (self.lock().limit, self.max)
    }

    /// (times lowered, lowest bound reached).
    pub fn decreases(&self) -> (u64, usize) {
        let s = self.lock();
        (s.decreases, s.lowest)
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
        let c = ChatClient::new(&["http://127.0.0.1:1/v1".to_string()], Some(k), RetryPolicy::default(), 1).unwrap();
        assert_eq!(c.redact("echo sk-VERYSECRET back"), "echo *** back");
    }

    #[test]
    fn every_key_fragment_of_eight_or_more_is_redacted() {
        let k = Secret::new("sk-test-Zq8VxK3mP1wLr7TbN4cY".into());
        // A prefix, a suffix and a middle piece, as a cut snippet or a partial echo leaves them.
        assert_eq!(k.redact("auth: Bearer sk-test-Zq8VxK3"), "auth: Bearer ***");
        assert_eq!(k.redact("...mP1wLr7TbN4cY\" }"), "...***\" }");
        assert_eq!(k.redact("x=VxK3mP1wL;y=VxK3mP1"), "x=***;y=VxK3mP1");
        assert_eq!(k.redact("two: sk-test-Zq8VxK3mP1wLr7TbN4cY sk-test-Zq8VxK3mP1wLr7TbN4cY."), "two: *** ***.");
        // Pieces under eight characters, and text without the key, stay.
        assert_eq!(k.redact("sk-test and Zq8 and Lr7TbN4"), "sk-test and Zq8 and Lr7TbN4");
        assert_eq!(k.redact("é plain ünïcode"), "é plain ünïcode");
        // A short key is redacted whole; a key with multi-byte characters on character boundaries.
        assert_eq!(Secret::new("abc".into()).redact("xabcx ab"), "x***x ab");
        let cyrillic = Secret::new("ключ-123456".into());
        assert_eq!(cyrillic.redact("a ч-123456 b"), "a *** b");
        // A match that starts inside a character (same last byte, other first byte) widens to it.
        assert_eq!(cyrillic.redact("a Ї-123456 b"), "a *** b");
        // Redaction comes before the snippet cut: the cut cannot revive a prefix.
        let body = format!("{}{}", "x".repeat(290), "Bearer sk-test-Zq8VxK3mP1wLr7TbN4cY");
        let snippet: String = k.redact(&body).chars().take(300).collect();
        assert!(!snippet.contains("sk-test-"), "{snippet}");
    }

    #[test]
    fn window_halves_once_per_round_and_grows_back() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let changed = Arc::new(tokio::sync::Notify::new());
            let w = Window::shared(8, changed.clone());
            let slots: Vec<Slot<'_>> = (0..8).map(|_| w.try_acquire().expect("room for eight")).collect();
            // Eight requests of one burst time out: one decrease, not three.
            assert_eq!(w.on_timeout(&slots[0]), Some((8, 4)));
            assert_eq!(w.on_timeout(&slots[1]), None);
            drop(slots);
            let s = w.try_acquire().unwrap();
            assert_eq!(w.on_timeout(&s), Some((4, 2)));
            drop(s);
            assert_eq!(w.bound(), (2, 8));
            // Only two fit now; a third waits until one is given back, and the waiters are told.
            let (a, _b) = (w.try_acquire().unwrap(), w.try_acquire().unwrap());
            assert!(w.try_acquire().is_none(), "the bound was exceeded");
            let told = changed.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            drop(a);
            tokio::time::timeout(Duration::from_millis(50), told).await.expect("a freed slot is announced");
            let _c = w.try_acquire().expect("a freed slot is handed on");
            // Additive increase: a bound's worth of answers widens it by one.
            w.on_success();
            w.on_success();
            assert_eq!(w.bound(), (3, 8));
            assert_eq!(w.decreases(), (2, 2));
        });
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy =
            RetryPolicy { backoff_base: Duration::from_millis(100), max_backoff: Duration::from_millis(1000), ..Default::default() };
        let c = ChatClient::new(&["http://127.0.0.1:1/v1".to_string()], None, policy, 1).unwrap();
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
