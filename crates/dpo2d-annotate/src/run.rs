//! The annotation run: load pairs, send one judge request per (pair, aspect)
//! under a concurrency bound, repair or fail bad answers, commit every
//! finished judgement to the cache, then write the scored pairs atomically
//! and report what failed. Nothing is dropped silently: a pair is either in
//! the output or listed as failed.

use crate::batch::{BatchDone, BatchReport};
use crate::cache::{cache_key, Cache, Judgement};
use crate::client::{ChatClient, ChatError, Completion, Reason, ServerReport};
use crate::expectation::RatingFrom;
use crate::judge::{FormatChoice, JudgeSettings};
use crate::parse::{check, enforce_monotone, parse_answer, Checked, Parsed};
use crate::prompt::{
    assistant, build_prompt, build_repair, default_max_tokens, user, Aspect, ChatRequest, ResponseFormat, ResponseFormatSpec, Tagging,
};
use anyhow::{bail, Context, Result};
use dpo2d_data::{Pair, Response, Scores, Segment};
use dpo2d_ui::ProgressBar;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// What to ask the judge, and where (`judge.max_tokens` of `None` sizes each
/// request to its pair's segments: [`default_max_tokens`]).
#[derive(Debug, Clone)]
pub struct Options {
    pub judge: JudgeSettings,
    /// Aspects to request; the others must already be scored in the input.
    pub aspects: Vec<Aspect>,
    /// Show a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

/// Files of one run.
#[derive(Debug, Clone)]
pub struct AnnotateJob {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Defaults to `<output>.cache.sqlite`.
    pub cache: Option<PathBuf>,
    /// Where to write the pairs that could not be annotated (JSONL).
    pub failed_out: Option<PathBuf>,
    /// How the requests reach the judge.
    pub route: Route,
}

/// How a run's requests reach the judge.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Route {
    /// One request at a time to the server (or fleet), as they are ready.
    #[default]
    Direct,
    /// Print the request bodies to stdout instead of sending them.
    DryRun,
    /// Through the server's Batch API, polled every `poll_interval`.
    Batch { poll_interval: Duration, limits: crate::batch_api::BatchLimits },
    /// Write the requests not yet judged as a batch input file, and stop.
    WriteRequests(PathBuf),
    /// Read the answers from a batch results file (OpenAI's or vLLM `run_batch`'s output).
    ReadResults(PathBuf),
}

/// Per-aspect counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AspectStats {
    /// Judgements available (fresh or cached).
    pub judged: usize,
    /// Of those, taken from the cache without a request.
    pub cached: usize,
    /// Judgements that needed the repair request.
    pub repairs: usize,
    /// Completeness ratings raised by the running maximum.
    pub corrections: usize,
    /// Judgements that failed (after retries and the repair request).
    pub failed: usize,
}

/// A pair that is not in the output, with why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedPair {
    /// 1-based line in the input file.
    pub line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    /// Aspect name (or "input") -> reason.
    pub errors: BTreeMap<String, String>,
    pub pair: Pair,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub pairs_in: usize,
    pub pairs_written: usize,
    pub failed: Vec<FailedPair>,
    pub aspects: Vec<(Aspect, AspectStats)>,
    /// HTTP requests sent, including retries and repair requests.
    pub requests: u64,
    pub retries: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Failed attempts per reason (timeouts, 5xx, ...), nonzero ones only.
    pub failures_by_reason: Vec<(Reason, u64)>,
    /// Answers cut off at `max_tokens`.
    pub cut_answers: u64,
    /// Answers that rated IDs the request did not have, or an ID more than once.
    pub odd_answers: u64,
    /// Times the concurrency was lowered after timeouts, and the lowest it went.
    pub concurrency_cuts: (u64, usize),
    /// Each server's requests and failures (listed when there are several).
    pub servers: Vec<ServerReport>,
    /// The server rejected `response_format`, so answers were asked in free text.
    pub fell_back_to_free_text: bool,
    /// Requests printed by `--dry-run`.
    pub dry_run_requests: usize,
    /// What went through batches (Batch API, or request and result files).
    pub batch: Option<BatchReport>,
    pub output: PathBuf,
    pub cache: PathBuf,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(b @ BatchReport { written: Some(path), .. }) = &self.batch {
            return write!(
                f,
                "{} request(s) written to {} ({} judgement(s) were cached already); run them, e.g. with vLLM's run_batch, \
                 then read the results back with --batch-read",
                b.requests,
                path.display(),
                b.cached
            );
        }
        if self.dry_run_requests > 0 || (self.pairs_in > 0 && self.aspects.is_empty()) {
            return write!(f, "dry run: {} request(s) for {} pair(s) printed, nothing sent", self.dry_run_requests, self.pairs_in);
        }
        writeln!(f, "{:<13} {:>8} {:>8} {:>8} {:>12} {:>8}", "aspect", "judged", "cached", "repairs", "corrections", "failed")?;
        for (a, s) in &self.aspects {
            let corr = if *a == Aspect::Completeness { s.corrections.to_string() } else { "-".into() };
            writeln!(f, "{:<13} {:>8} {:>8} {:>8} {:>12} {:>8}", a.name(), s.judged, s.cached, s.repairs, corr, s.failed)?;
        }
        writeln!(
            f,
            "requests: {} sent ({} retries); tokens: {} prompt + {} completion",
            self.requests, self.retries, self.prompt_tokens, self.completion_tokens
        )?;
        if self.servers.len() > 1 {
            for r in &self.servers {
                writeln!(
                    f,
                    "  server {}: {} requests, {} answered, {} failed attempts{}",
                    r.url,
                    r.requests,
                    r.answered,
                    r.failed_attempts,
                    if r.times_set_aside > 0 { format!(", set aside {} time(s)", r.times_set_aside) } else { String::new() }
                )?;
            }
        }
        if let Some(b) = &self.batch {
            writeln!(f, "{b}")?;
        }
        self.fmt_troubles(f)?;
        write!(
            f,
            "pairs: {} in, {} written to {}, {} failed",
            self.pairs_in,
            self.pairs_written,
            self.output.display(),
            self.failed.len()
        )?;
        if !self.failed.is_empty() {
            writeln!(f)?;
            for fp in self.failed.iter().take(20) {
                let id = fp.id.as_ref().map(|v| format!(" (id {v})")).unwrap_or_default();
                writeln!(f, "  failed: line {}{id}: {}", fp.line, describe_errors(&fp.errors))?;
            }
            if self.failed.len() > 20 {
                writeln!(f, "  ... and {} more", self.failed.len() - 20)?;
            }
            write!(f, "rerun the same command to retry the failed pairs (finished judgements are cached in {})", self.cache.display())?;
        }
        Ok(())
    }
}

impl Summary {
    /// The lines about what went wrong on the way, only when something did.
    fn fmt_troubles(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.failures_by_reason.is_empty() {
            let list: Vec<String> = self.failures_by_reason.iter().map(|(r, n)| format!("{n} {}", r.name())).collect();
            writeln!(f, "failed attempts: {}", list.join(", "))?;
        }
        if self.concurrency_cuts.0 > 0 {
            writeln!(
                f,
                "concurrency lowered {} time(s) after timeouts, down to {} (set --concurrency to the server's parallel slots)",
                self.concurrency_cuts.0, self.concurrency_cuts.1
            )?;
        }
        if self.fell_back_to_free_text {
            writeln!(f, "the server rejected response_format: answers were asked as free text")?;
        }
        if self.cut_answers > 0 {
            writeln!(f, "{} answer(s) cut off at max_tokens (repaired or failed; see --max-tokens)", self.cut_answers)?;
        }
        if self.odd_answers > 0 {
            writeln!(f, "{} answer(s) rated IDs the request did not have, or an ID more than once", self.odd_answers)?;
        }
        Ok(())
    }
}

/// One line for a failed pair's reasons; aspects that failed for the same
/// reason are named together so a dead server gives one reason, not five.
fn describe_errors(errors: &BTreeMap<String, String>) -> String {
    let mut groups: Vec<(Vec<&str>, &str)> = Vec::new();
    for (aspect, why) in errors {
        match groups.iter_mut().find(|(_, w)| *w == why.as_str()) {
            Some((names, _)) => names.push(aspect),
            None => groups.push((vec![aspect], why)),
        }
    }
    groups.iter().map(|(names, why)| format!("{}: {why}", names.join(", "))).collect::<Vec<_>>().join("; ")
}

/// Default cache file: next to the output, `<output>.cache.sqlite`.
pub fn default_cache_path(output: &Path) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(".cache.sqlite");
    PathBuf::from(s)
}

/// A pair ready for requests: its segments for both sides.
pub(crate) struct Prepared {
    pub(crate) line: usize,
    pub(crate) pair: Pair,
    pub(crate) chosen: Vec<Segment>,
    pub(crate) rejected: Vec<Segment>,
}

fn segments_of(r: &Response) -> Vec<Segment> {
    match r {
        Response::Segmented { segments } => segments.clone(),
        Response::Plain(text) => dpo2d_data::segment(text).into_iter().map(|t| Segment { text: t.to_string(), scores: None }).collect(),
    }
}

/// Reads the input and segments plain responses. Pairs that cannot be
/// annotated (an empty response, missing scores needed with `--aspects`)
/// become failures right away.
fn prepare(path: &Path, aspects: &[Aspect]) -> Result<(Vec<Prepared>, Vec<FailedPair>)> {
    let loaded = dpo2d_data::load_pairs(path, &dpo2d_data::LoadOptions::default())?;
    let partial = aspects.len() < Aspect::ALL.len();
    let mut ready = Vec::new();
    let mut failed = Vec::new();
    for (pair, line) in loaded.pairs.into_iter().zip(loaded.line_numbers) {
        let chosen = segments_of(&pair.chosen);
        let rejected = segments_of(&pair.rejected);
        let mut why = None;
        if chosen.is_empty() || rejected.is_empty() {
            why = Some("a response is empty, there is nothing to score".to_string());
        } else if partial && chosen.iter().chain(&rejected).any(|s| s.scores.is_none()) {
            why = Some("--aspects names only some aspects, so every segment must already carry scores for the others".to_string());
        }
        match why {
            Some(w) => failed.push(FailedPair { line, id: pair.id.clone(), errors: [("input".to_string(), w)].into(), pair }),
            None => ready.push(Prepared { line, pair, chosen, rejected }),
        }
    }
    Ok((ready, failed))
}

pub(crate) fn request_body(req: &ChatRequest) -> String {
    serde_json::to_string(req).expect("a chat request always serialises")
}

/// The first request for one (pair, aspect), at temperature 0.
fn first_request(judge: &JudgeSettings, item: &Prepared, aspect: Aspect, structured: bool) -> ChatRequest {
    let (model, max_tokens) = (&judge.model, judge.max_tokens);
    let tags = Tagging::new(item.chosen.len(), item.rejected.len());
    let prompt = build_prompt(&item.pair, &item.chosen, &item.rejected, aspect, structured);
    let max_tokens = match max_tokens {
        None => Some(default_max_tokens(tags.len())),
        Some(n) => Some(n).filter(|&n| n > 0),
    };
    let response_format = structured.then(|| ResponseFormatSpec::for_answer(&tags, aspect));
    ChatRequest {
        model: model.to_string(),
        messages: vec![user(prompt)],
        temperature: 0.0,
        max_tokens,
        response_format,
        logprobs: None,
        top_logprobs: None,
    }
    .with_logprobs(judge.rating_from)
}

/// The temperature of the repair request: a judge that looped or misread
/// the format at temperature 0 would likely do it again.
pub const REPAIR_TEMPERATURE: f32 = 0.3;

/// Shared state of the workers.
pub(crate) struct Ctx {
    pub(crate) client: ChatClient,
    pub(crate) cache: Cache,
    pub(crate) judge: JudgeSettings,
    pub(crate) formats: FormatChoice,
    pub(crate) failed_now: AtomicU64,
    pub(crate) repairs_now: AtomicU64,
    pub(crate) cut_answers: AtomicU64,
    pub(crate) odd_answers: AtomicU64,
    pub(crate) fatal: AtomicBool,
}

impl Ctx {
    pub(crate) fn request(&self, item: &Prepared, aspect: Aspect, structured: bool) -> ChatRequest {
        first_request(&self.judge, item, aspect, structured)
    }
}

#[derive(Clone)]
pub(crate) enum Outcome {
    Ok { judgement: Judgement, cached: bool },
    Failed(String),
    Fatal(String),
}

fn failure(e: ChatError, context: &str) -> Outcome {
    match e {
        ChatError::Fatal(m) => Outcome::Fatal(m),
        ChatError::Request(m) | ChatError::FormatRejected(m) => Outcome::Failed(format!("{context}{m}")),
    }
}

/// A finished judgement of this request from an earlier run, in any answer form.
pub(crate) async fn cached(ctx: &Ctx, item: &Prepared, aspect: Aspect) -> Result<Option<Judgement>, String> {
    for &structured in ctx.formats.forms() {
        let key = cache_key(&ctx.judge.model, &request_body(&ctx.request(item, aspect, structured)));
        match ctx.cache.get_async(key).await {
            Ok(Some(j)) if j.first.len() == item.chosen.len() && j.second.len() == item.rejected.len() => return Ok(Some(j)),
            Ok(_) => {}
            Err(e) => return Err(format!("{e:#}")),
        }
    }
    Ok(None)
}

/// Parses an answer and says what is odd about it: cut off at
/// `max_tokens`, IDs the request did not have, IDs rated twice.
fn read_answer(ctx: &Ctx, item: &Prepared, aspect: Aspect, tags: &Tagging, c: &Completion) -> Parsed {
    if c.finish_reason.as_deref() == Some("length") {
        ctx.cut_answers.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(line = item.line, aspect = aspect.name(), "the answer was cut off at max_tokens");
    }
    let mut parsed = parse_answer(&c.content);
    if ctx.judge.rating_from.asks_logprobs() {
        parsed.take_expectations(&c.logprobs, aspect);
    }
    let list = |ids: &mut dyn Iterator<Item = &u32>| ids.map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let mut odd = Vec::new();
    let extra = parsed.extra_ids(tags);
    if !extra.is_empty() {
        odd.push(format!("rates ID(s) {} that the request does not have (ignored)", list(&mut extra.iter())));
    }
    if !parsed.repeated.is_empty() {
        odd.push(format!("repeats ID(s) {} with the same rating", list(&mut parsed.repeated.iter())));
    }
    if !parsed.conflicts.is_empty() {
        odd.push(format!("rates ID(s) {} twice, differently", list(&mut parsed.conflicts.keys())));
    }
    if !odd.is_empty() {
        ctx.odd_answers.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("line {}, {}: the judge's answer {}", item.line, aspect.name(), odd.join("; "));
    }
    parsed
}

/// A request and the answer it got.
struct Asked {
    req: ChatRequest,
    answer: String,
    parsed: Parsed,
}

/// Judges one (pair, aspect): cache, request, one repair if needed, commit.
async fn judge(ctx: Arc<Ctx>, item: Arc<Prepared>, aspect: Aspect) -> Outcome {
    match cached(&ctx, &item, aspect).await {
        Ok(Some(judgement)) => return Outcome::Ok { judgement, cached: true },
        Ok(None) => {}
        Err(m) => return Outcome::Fatal(m),
    }
    let (req, first) = match ctx.formats.complete(&ctx.client, |s| ctx.request(&item, aspect, s)).await {
        Ok(x) => x,
        Err(e) => return failure(e, ""),
    };
    settle(&ctx, &item, aspect, req, first, true).await
}

/// A judgement once the first answer is in (from the server, or from a
/// batch's results): read it, repair it once if needed and allowed, and
/// keep it in the cache, keyed by the first request as built.
pub(crate) async fn settle(ctx: &Ctx, item: &Prepared, aspect: Aspect, req: ChatRequest, first: Completion, may_repair: bool) -> Outcome {
    if ctx.judge.rating_from == RatingFrom::Logprobs && first.logprobs.is_empty() {
        return Outcome::Fatal("the judge's server returned no log-probabilities (use --judge-rating-from auto or text)".into());
    }
    let key = cache_key(&ctx.judge.model, &request_body(&req));
    let tags = Tagging::new(item.chosen.len(), item.rejected.len());
    let parsed = read_answer(ctx, item, aspect, &tags, &first);
    let (checked, repaired, answer) = match check(&parsed, &tags, aspect) {
        Ok(c) => (c, false, first.content),
        Err(problems) if may_repair => {
            let asked = Asked { req, answer: first.content, parsed };
            match repair(ctx, item, aspect, &tags, asked, &problems).await {
                Ok(x) => x,
                Err(outcome) => return outcome,
            }
        }
        Err(problems) => {
            return Outcome::Failed(format!("unusable answer (no repair request for results read from a file): {}", problems.join(" ")))
        }
    };
    // A server that echoes headers must not get the key into the cache.
    let answer = ctx.client.redact(&answer);
    let judgement = Judgement { first: checked.first, second: checked.second, repaired, answer };
    if let Err(e) = ctx.cache.put_async(key, ctx.judge.model.clone(), aspect.name(), judgement.clone()).await {
        return Outcome::Fatal(format!("{e:#}"));
    }
    Outcome::Ok { judgement, cached: false }
}

/// The one repair request: the conversation so far and every problem, at
/// [`REPAIR_TEMPERATURE`]. The repair answer wins; the unambiguous ratings
/// of the first answer fill its gaps.
async fn repair(
    ctx: &Ctx,
    item: &Prepared,
    aspect: Aspect,
    tags: &Tagging,
    asked: Asked,
    problems: &[String],
) -> Result<(Checked, bool, String), Outcome> {
    tracing::debug!(line = item.line, aspect = aspect.name(), "repair needed: {}", problems.join(" "));
    ctx.repairs_now.fetch_add(1, Ordering::Relaxed);
    let structured = asked.req.response_format.is_some();
    let mut req = asked.req;
    req.messages.push(assistant(asked.answer.clone()));
    req.messages.push(user(build_repair(tags, aspect, problems, structured)));
    req.temperature = REPAIR_TEMPERATURE;
    let second = ctx.client.complete(&req).await.map_err(|e| failure(e, "repair request: "))?;
    let mut parsed = read_answer(ctx, item, aspect, tags, &second);
    parsed.fill_from(&asked.parsed);
    match check(&parsed, tags, aspect) {
        Ok(c) => Ok((c, true, format!("{}\n\n--- after repair request ---\n\n{}", asked.answer, second.content))),
        Err(problems) => Err(Outcome::Failed(format!("unusable answer after one repair request: {}", problems.join(" ")))),
    }
}

/// Writes `items` as JSONL (gzip when the name ends in `.gz`) to a temporary
/// file next to `path`, then renames it over `path`, so a reader never sees
/// a half-written file.
pub fn write_atomic<T: serde::Serialize>(path: &Path, items: &[T]) -> Result<()> {
    dpo2d_fs::write_file_with(path, |tmp| {
        let mut w = dpo2d_data::io::create_writer(tmp)?;
        for it in items {
            serde_json::to_writer(&mut w, it).context("cannot serialise a record")?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
        Ok(())
    })
}

/// Runs a whole annotation job (blocking; starts its own async runtime).
pub fn annotate_file(job: &AnnotateJob, opts: &Options) -> Result<Summary> {
    if opts.aspects.is_empty() {
        bail!("no aspects to annotate");
    }
    let (ready, failed) = prepare(&job.input, &opts.aspects)?;
    let pairs_in = ready.len() + failed.len();
    let cache_path = job.cache.clone().unwrap_or_else(|| default_cache_path(&job.output));
    if job.route == Route::DryRun {
        let n = print_requests(&ready, opts)?;
        return Ok(Summary { pairs_in, dry_run_requests: n, output: job.output.clone(), cache: cache_path, ..Default::default() });
    }

    let cache = Cache::open(&cache_path)?;
    let ctx = Arc::new(Ctx {
        client: opts.judge.client()?,
        cache,
        judge: opts.judge.clone(),
        formats: FormatChoice::new(opts.judge.response_format),
        failed_now: AtomicU64::new(0),
        repairs_now: AtomicU64::new(0),
        cut_answers: AtomicU64::new(0),
        odd_answers: AtomicU64::new(0),
        fatal: AtomicBool::new(false),
    });
    let ready: Vec<Arc<Prepared>> = ready.into_iter().map(Arc::new).collect();
    let tasks: Vec<(usize, Aspect)> = (0..ready.len()).flat_map(|i| opts.aspects.iter().map(move |&a| (i, a))).collect();

    let bar = dpo2d_ui::progress::bar_if(
        opts.progress,
        tasks.len() as u64,
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} judgements, eta {eta} {msg}",
    );
    // Without a terminal the bar is hidden; print its line now and then instead.
    let status_lines = opts.progress && bar.is_hidden();

    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the async runtime")?;
    let (results, batch) = match &job.route {
        Route::Direct | Route::DryRun => {
            let results = rt.block_on(drive(ctx.clone(), ready.clone(), tasks, opts.judge.concurrency, bar.clone(), status_lines));
            bar.finish_and_clear();
            (results?, None)
        }
        route => {
            let done = rt.block_on(crate::batch::drive(ctx.clone(), &ready, tasks, route, bar.clone()));
            bar.finish_and_clear();
            match done? {
                BatchDone::Results(results, report) => (results, Some(report)),
                BatchDone::Written(report) => {
                    return Ok(Summary {
                        pairs_in,
                        batch: Some(report),
                        output: job.output.clone(),
                        cache: cache_path,
                        ..Default::default()
                    })
                }
            }
        }
    };

    let (written, failed, per_aspect) = assemble(&ready, &opts.aspects, &results, failed);
    write_atomic(&job.output, &written)?;
    if let Some(fo) = &job.failed_out {
        write_atomic(fo, &failed)?;
    }
    let stats = &ctx.client.stats;
    Ok(Summary {
        pairs_in,
        pairs_written: written.len(),
        failed,
        aspects: per_aspect.into_iter().collect(),
        requests: stats.requests.load(Ordering::Relaxed),
        retries: stats.retries.load(Ordering::Relaxed),
        prompt_tokens: stats.prompt_tokens.load(Ordering::Relaxed),
        completion_tokens: stats.completion_tokens.load(Ordering::Relaxed),
        failures_by_reason: Reason::ALL.iter().map(|&r| (r, stats.failures(r))).filter(|(_, n)| *n > 0).collect(),
        cut_answers: ctx.cut_answers.load(Ordering::Relaxed),
        odd_answers: ctx.odd_answers.load(Ordering::Relaxed),
        concurrency_cuts: ctx.client.decreases(),
        servers: ctx.client.servers(),
        fell_back_to_free_text: ctx.formats.fell_back(),
        dry_run_requests: 0,
        batch,
        output: job.output.clone(),
        cache: cache_path,
    })
}

/// `--dry-run`: prints the first request of every judgement, as a real run
/// would send it first; returns how many.
fn print_requests(ready: &[Prepared], opts: &Options) -> Result<usize> {
    let structured = opts.judge.response_format != ResponseFormat::FreeText;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut n = 0;
    for item in ready {
        for &a in &opts.aspects {
            writeln!(out, "{}", request_body(&first_request(&opts.judge, item, a, structured)))?;
            n += 1;
        }
    }
    out.flush()?;
    Ok(n)
}

type Written = (Vec<Pair>, Vec<FailedPair>, BTreeMap<Aspect, AspectStats>);

/// Puts the judgements into the pairs: a pair is written when every aspect
/// was judged, otherwise it joins `failed` with the reasons.
fn assemble(
    ready: &[Arc<Prepared>],
    aspects: &[Aspect],
    results: &BTreeMap<(usize, Aspect), Outcome>,
    mut failed: Vec<FailedPair>,
) -> Written {
    let mut per_aspect: BTreeMap<Aspect, AspectStats> = aspects.iter().map(|&a| (a, AspectStats::default())).collect();
    let mut written = Vec::new();
    for (i, item) in ready.iter().enumerate() {
        let mut errors = BTreeMap::new();
        let mut chosen: Vec<[u8; 5]> = item.chosen.iter().map(|s| s.scores.map(|x| x.to_array()).unwrap_or([0; 5])).collect();
        let mut rejected: Vec<[u8; 5]> = item.rejected.iter().map(|s| s.scores.map(|x| x.to_array()).unwrap_or([0; 5])).collect();
        for &a in aspects {
            let st = per_aspect.get_mut(&a).expect("every requested aspect has stats");
            match results.get(&(i, a)) {
                Some(Outcome::Ok { judgement, cached }) => {
                    st.judged += 1;
                    st.cached += usize::from(*cached);
                    st.repairs += usize::from(judgement.repaired);
                    let mut first = judgement.first.clone();
                    let mut second = judgement.second.clone();
                    if a == Aspect::Completeness {
                        st.corrections += enforce_monotone(&mut first) + enforce_monotone(&mut second);
                    }
                    for (row, r) in chosen.iter_mut().zip(first) {
                        row[a.index()] = r;
                    }
                    for (row, r) in rejected.iter_mut().zip(second) {
                        row[a.index()] = r;
                    }
                }
                Some(Outcome::Failed(m)) | Some(Outcome::Fatal(m)) => {
                    st.failed += 1;
                    errors.insert(a.name().to_string(), m.clone());
                }
                None => {
                    st.failed += 1;
                    errors.insert(a.name().to_string(), "not judged (the run stopped early)".into());
                }
            }
        }
        if errors.is_empty() {
            let mut pair = item.pair.clone();
            pair.chosen = Response::Segmented { segments: with_scores(&item.chosen, &chosen) };
            pair.rejected = Response::Segmented { segments: with_scores(&item.rejected, &rejected) };
            written.push(pair);
        } else {
            failed.push(FailedPair { line: item.line, id: item.pair.id.clone(), errors, pair: item.pair.clone() });
        }
    }
    failed.sort_by_key(|f| f.line);
    (written, failed, per_aspect)
}

fn with_scores(segs: &[Segment], rows: &[[u8; 5]]) -> Vec<Segment> {
    segs.iter().zip(rows).map(|(s, r)| Segment { text: s.text.clone(), scores: Some(Scores::from_array(*r)) }).collect()
}

/// The progress line's tail: the current bound on requests in flight, then
/// how many attempts failed for each reason, repairs, cut-off answers and
/// failed judgements, so a run that makes no progress says why without `-v`.
fn progress_message(ctx: &Ctx) -> String {
    let s = &ctx.client.stats;
    let (bound, max) = ctx.client.bound();
    let mut m = format!("| in flight ≤ {bound}/{max}");
    let servers = ctx.client.servers();
    if servers.len() > 1 {
        m.push_str(&format!(" | servers {}", crate::client::fleet_line(&servers)));
    }
    let reasons: Vec<String> =
        Reason::ALL.iter().filter(|&&r| s.failures(r) > 0).map(|&r| format!("{} {}", s.failures(r), r.name())).collect();
    if !reasons.is_empty() {
        m.push_str(&format!(" | failed attempts: {} (retrying {})", reasons.join(", "), s.retrying_now.load(Ordering::Relaxed)));
    }
    for (n, what) in [
        (ctx.repairs_now.load(Ordering::Relaxed), "repairs"),
        (ctx.cut_answers.load(Ordering::Relaxed), "cut at max_tokens"),
        (ctx.failed_now.load(Ordering::Relaxed), "failed"),
    ] {
        if n > 0 {
            m.push_str(&format!(" | {what} {n}"));
        }
    }
    m
}

/// Runs the judgements with a bounded window of tasks; stops on Ctrl-C or
/// on a fatal server answer (bad key, wrong URL), leaving the cache intact.
async fn drive(
    ctx: Arc<Ctx>,
    ready: Vec<Arc<Prepared>>,
    tasks: Vec<(usize, Aspect)>,
    concurrency: usize,
    bar: ProgressBar,
    status_lines: bool,
) -> Result<BTreeMap<(usize, Aspect), Outcome>> {
    let window = concurrency.max(1) * 4;
    let mut set: JoinSet<((usize, Aspect), Outcome)> = JoinSet::new();
    let mut results = BTreeMap::new();
    let mut next = 0;
    let mut done_cached = 0u64;
    let total = tasks.len();
    let ticker = {
        let ctx = ctx.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            for tick in 1u64.. {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let m = progress_message(&ctx);
                if status_lines && tick % 120 == 0 {
                    eprintln!("progress: {}/{} judgements {m}", bar.position(), bar.length().unwrap_or(0));
                }
                bar.set_message(m);
            }
        })
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut fatal: Option<String> = None;
    while results.len() < total {
        while set.len() < window && next < total {
            let (i, a) = tasks[next];
            next += 1;
            let (ctx, item) = (ctx.clone(), ready[i].clone());
            set.spawn(async move { ((i, a), judge(ctx, item, a).await) });
        }
        tokio::select! {
            joined = set.join_next() => {
                let Some(joined) = joined else { break };
                let (k, outcome) = joined.context("an annotation task crashed")?;
                match &outcome {
                    Outcome::Ok { cached, .. } => done_cached += u64::from(*cached),
                    Outcome::Failed(m) => {
                        ctx.failed_now.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("line {}, {}: failed: {m}", ready[k.0].line, k.1.name());
                    }
                    Outcome::Fatal(m) => {
                        fatal = Some(m.clone());
                        ctx.fatal.store(true, Ordering::Relaxed);
                    }
                }
                results.insert(k, outcome);
                bar.inc(1);
                if fatal.is_some() {
                    break;
                }
            }
            _ = &mut ctrl_c => {
                set.abort_all();
                ticker.abort();
                let saved = ctx.cache.len().unwrap_or(0);
                bail!(
                    "interrupted: {} of {total} judgements finished; {saved} judgement(s) are saved in {}; rerun the same command to continue",
                    results.len(),
                    ctx.cache.path().display()
                );
            }
        }
    }
    ticker.abort();
    set.abort_all();
    if let Some(m) = fatal {
        bail!("stopping: {m}");
    }
    tracing::info!("{done_cached} judgement(s) came from the cache");
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RetryPolicy;
    use crate::test_server::{expected_scores, MockConfig, MockFormat, MockJudge};

    fn pair_line(id: usize, marker: &str) -> String {
        serde_json::json!({
            "id": id,
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": format!("Question {id}: name two colours and a fruit. {marker}")}],
            "chosen": format!("Red and blue are colours. An apple is a fruit.\n\n- Item {id} is here."),
            "rejected": {"segments": [{"text": "Colours exist. "}, {"text": format!("Bananas number {id}.")}]},
        })
        .to_string()
    }

    fn opts(url: &str) -> Options {
        let judge = JudgeSettings {
            concurrency: 4,
            policy: RetryPolicy {
                timeout: Duration::from_millis(1000),
                max_retries: 2,
                backoff_base: Duration::from_millis(10),
                ..RetryPolicy::default()
            },
            ..JudgeSettings::new(url, "judge-test")
        };
        Options { judge, aspects: Aspect::ALL.to_vec(), progress: false }
    }

    fn with_judge(mut o: Options, f: impl FnOnce(&mut JudgeSettings)) -> Options {
        f(&mut o.judge);
        o
    }

    fn job_in(dir: &Path, markers: &[&str]) -> AnnotateJob {
        let input = dir.join("in.jsonl");
        let lines: Vec<String> = markers.iter().enumerate().map(|(i, m)| pair_line(i, m)).collect();
        std::fs::write(&input, lines.join("\n") + "\n").unwrap();
        AnnotateJob { input, output: dir.join("out.jsonl"), cache: None, failed_out: Some(dir.join("failed.jsonl")), route: Route::Direct }
    }

    fn assert_judged_by_the_mock(out: &[Pair]) {
        for p in out {
            for r in [&p.chosen, &p.rejected] {
                let segs = r.segments().unwrap();
                let got: Vec<[u8; 5]> = segs.iter().map(|s| s.scores.unwrap().to_array()).collect();
                assert_eq!(got, expected_scores(segs));
            }
        }
    }

    /// `--judge-rating-from logprobs`: each rating is the expectation over the
    /// rating tokens' probabilities (the mock leans 0.6 to the next rating of
    /// the scale), rounded to the scale: the neighbour, not the number written;
    /// in free text and under a schema alike. `text` keeps the written one.
    #[test]
    fn ratings_read_from_logprobs_are_the_expectation_rounded() {
        let lean = |aspect: usize, r: u8| -> u8 {
            let scale: &[u8] = if aspect == 2 { &[0, 4] } else { &[0, 1, 2, 3, 4] };
            let i = scale.iter().position(|&v| v == r).unwrap();
            if i + 1 < scale.len() {
                scale[i + 1]
            } else {
                scale[i - 1]
            }
        };
        for format in [MockFormat::Ignore, MockFormat::Honour] {
            let server = MockJudge::start(MockConfig { response_format: format, ..MockConfig::default() });
            let dir = tempfile::tempdir().unwrap();
            let job = job_in(dir.path(), &["", "[[style:markdown]]", ""]);
            let lp = with_judge(opts(server.base_url()), |j| j.rating_from = RatingFrom::Logprobs);
            let s = annotate_file(&job, &lp).unwrap();
            assert_eq!(s.pairs_written, 3, "{s}");
            for p in read_pairs(&job.output) {
                for r in [&p.chosen, &p.rejected] {
                    let segs = r.segments().unwrap();
                    let want = expected_scores(segs);
                    for (seg, w) in segs.iter().zip(want) {
                        let got = seg.scores.unwrap().to_array();
                        for a in [0, 1, 2, 4] {
                            assert_eq!(got[a], lean(a, w[a]), "{format:?}, aspect {a}: {:?}", seg.text);
                        }
                    }
                }
            }
            // Text mode: the numbers written.
            let text = AnnotateJob { cache: Some(dir.path().join("c-text")), output: dir.path().join("text.jsonl"), ..job };
            annotate_file(&text, &opts(server.base_url())).unwrap();
            assert_judged_by_the_mock(&read_pairs(&text.output));
        }
    }

    #[test]
    fn arithmetic_in_an_answer_is_never_read_as_ratings() {
        let server = MockJudge::start(MockConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let job = job_in(dir.path(), &["[[fault:arith]]", "[[fault:arith]]", "[[fault:arithalways@correctness]]"]);
        let s = annotate_file(&job, &opts(server.base_url())).unwrap();
        // Each arithmetic answer got a repair request, and the repair's ratings were used.
        assert_eq!(s.aspects.iter().map(|(_, st)| st.repairs).sum::<usize>(), 10, "{s}");
        assert_eq!(s.pairs_written, 2, "{s}");
        assert_judged_by_the_mock(&read_pairs(&job.output));
        assert!(s.failed[0].errors["correctness"].contains("No rating was found for ID(s) 1, 2, 3"), "{s}");
    }

    #[test]
    fn structured_answers_need_no_repair_and_a_rejecting_server_gets_free_text() {
        let dir = tempfile::tempdir().unwrap();
        let markers = ["", "", "", ""];
        let honour = MockJudge::start(MockConfig { response_format: MockFormat::Honour, ..MockConfig::default() });
        let s = annotate_file(&job_in(dir.path(), &markers), &opts(honour.base_url())).unwrap();
        assert_eq!((s.pairs_written, honour.stats().requests, honour.stats().with_response_format), (4, 20, 20), "{s}");
        assert_eq!(s.aspects.iter().map(|(_, st)| st.repairs).sum::<usize>(), 0);
        assert_judged_by_the_mock(&read_pairs(&job_in(dir.path(), &markers).output));

        let dir = tempfile::tempdir().unwrap();
        let job = job_in(dir.path(), &markers);
        let reject = MockJudge::start(MockConfig { response_format: MockFormat::Reject, ..MockConfig::default() });
        let s = annotate_file(&job, &opts(reject.base_url())).unwrap();
        let st = reject.stats();
        assert!(s.fell_back_to_free_text && s.pairs_written == 4, "{s}");
        // Only the requests in flight when the first rejection came back carried the field.
        assert!(st.with_response_format >= 1 && st.with_response_format <= 4, "{st:?}");
        assert_eq!(st.requests, 20 + st.with_response_format);
        assert_judged_by_the_mock(&read_pairs(&job.output));
        // A rerun finds the free-text judgements in the cache.
        reject.reset_stats();
        annotate_file(&job, &opts(reject.base_url())).unwrap();
        assert_eq!(reject.stats().requests, 0);

        // Asked for explicitly, a schema the server rejects stops the run; free text never sends one.
        let strict = with_judge(opts(reject.base_url()), |j| j.response_format = ResponseFormat::JsonSchema);
        let e = format!("{:#}", annotate_file(&AnnotateJob { cache: Some(dir.path().join("c2")), ..job.clone() }, &strict).unwrap_err());
        assert!(e.contains("does not take response_format"), "{e}");
        honour.reset_stats();
        let free = with_judge(opts(honour.base_url()), |j| j.response_format = ResponseFormat::FreeText);
        annotate_file(&AnnotateJob { cache: Some(dir.path().join("c3")), ..job }, &free).unwrap();
        assert_eq!((honour.stats().requests, honour.stats().with_response_format), (20, 0));
    }

    #[test]
    fn a_looping_judge_is_cut_and_repaired_or_retried_warmer() {
        let server = MockJudge::start(MockConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let job = job_in(dir.path(), &["[[fault:loop]]"]);
        // Default max_tokens: every first answer is cut off, and the warmer repair answers.
        let s = annotate_file(&job, &opts(server.base_url())).unwrap();
        assert_eq!((s.pairs_written, s.cut_answers, server.stats().requests), (1, 5, 10), "{s}");
        assert!(server.stats().temperatures.values().flatten().any(|&t| (t - f64::from(REPAIR_TEMPERATURE)).abs() < 1e-6));

        // No max_tokens: the loop runs into the timeout; the retry goes out warmer and is answered.
        server.reset_stats();
        let o = with_judge(opts(server.base_url()), |j| j.max_tokens = Some(0));
        let s = annotate_file(&AnnotateJob { cache: Some(dir.path().join("c2")), ..job }, &o).unwrap();
        assert_eq!(s.pairs_written, 1, "{s}");
        let st = server.stats();
        assert!(st.temperatures.values().all(|t| t.len() == 2 && t[0] == 0.0 && t[1] > 0.1), "{:?}", st.temperatures);
        assert!(s.failures_by_reason.contains(&(Reason::Timeout, 5)), "{s}");
    }

    #[test]
    fn timeouts_while_others_succeed_lower_the_concurrency() {
        // One server slot, 200 ms per answer: with 6 in flight the last ones wait past the timeout.
        let server = MockJudge::start(MockConfig { slots: Some(1), delay: Duration::from_millis(200), ..MockConfig::default() });
        let dir = tempfile::tempdir().unwrap();
        let job = job_in(dir.path(), &["", "", ""]);
        let mut o = opts(server.base_url());
        o.judge.concurrency = 6;
        o.judge.policy.timeout = Duration::from_millis(900);
        o.judge.policy.max_retries = 8;
        let s = annotate_file(&job, &o).unwrap();
        assert_eq!(s.pairs_written, 3, "{s}");
        assert!(s.concurrency_cuts.0 >= 1 && s.concurrency_cuts.1 <= 3, "{s}");
        assert!(s.to_string().contains("concurrency lowered"), "{s}");
    }

    #[test]
    fn extra_ids_warn_and_conflicting_ratings_fail_with_the_reason() {
        let server = MockJudge::start(MockConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let job = job_in(dir.path(), &["[[fault:extra]]", "[[fault:conflict@clarity]]"]);
        let s = annotate_file(&job, &opts(server.base_url())).unwrap();
        assert_eq!(s.pairs_written, 1, "{s}");
        // Five answers with an extra ID, then the conflicting first answer and its repair.
        assert_eq!(s.odd_answers, 7, "{s}");
        assert!(s.failed[0].errors["clarity"].contains("rated more than once, with different ratings"), "{s}");
        let failed_file = std::fs::read_to_string(job.failed_out.as_ref().unwrap()).unwrap();
        assert!(failed_file.contains("rated more than once"), "{failed_file}");
    }

    fn read_pairs(p: &Path) -> Vec<Pair> {
        std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn content_faults_are_repaired_or_reported_and_rerun_retries_only_failures() {
        let server = MockJudge::start(MockConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        let markers = [
            "",
            "[[style:json]]",
            "[[style:markdown]]",
            "[[fault:garbage]]",
            "[[fault:missing@correctness]]",
            "[[fault:safety2]]",
            "[[fault:alwaysbad@clarity]]",
            "[[fault:500always@helpfulness]]",
            "[[fault:truncated@completeness]]",
            "[[fault:badrange@clarity]]",
        ];
        let lines: Vec<String> = markers.iter().enumerate().map(|(i, m)| pair_line(i, m)).collect();
        std::fs::write(&input, lines.join("\n") + "\n").unwrap();
        let job = AnnotateJob {
            input: input.clone(),
            output: dir.path().join("out.jsonl"),
            cache: None,
            failed_out: Some(dir.path().join("failed.jsonl")),
            route: Route::Direct,
        };
        let s = annotate_file(&job, &opts(server.base_url())).unwrap();
        assert_eq!(s.pairs_in, 10);
        assert_eq!(s.pairs_written, 8, "{s}");
        let failed_lines: Vec<usize> = s.failed.iter().map(|f| f.line).collect();
        assert_eq!(failed_lines, vec![7, 8]);
        assert!(s.failed[0].errors["clarity"].contains("after one repair"), "{:?}", s.failed[0].errors);
        assert!(s.failed[1].errors["helpfulness"].contains("gave up after 3 attempts"), "{:?}", s.failed[1].errors);
        let stats: BTreeMap<Aspect, AspectStats> = s.aspects.iter().cloned().collect();
        // garbage: all five; missing: correctness; safety2: safety; truncated: completeness; badrange: clarity.
        assert_eq!(stats[&Aspect::Helpfulness].repairs, 1);
        assert_eq!(stats[&Aspect::Correctness].repairs, 2);
        assert_eq!(stats[&Aspect::Safety].repairs, 2, "{s}");
        assert_eq!(stats[&Aspect::Completeness].repairs, 2);
        assert_eq!(stats[&Aspect::Clarity].repairs, 2);
        assert_eq!(stats[&Aspect::Clarity].failed, 1);
        assert_eq!(stats[&Aspect::Helpfulness].failed, 1);
        assert_eq!(stats[&Aspect::Safety].failed, 0);

        // Every written pair is fully scored, valid, and carries the judge's ratings.
        let out = read_pairs(&job.output);
        let mut corrections = 0;
        for p in &out {
            assert!(dpo2d_data::check_pair(p, &dpo2d_data::LoadOptions::new(dpo2d_data::Requirement::Scored)).is_empty());
            for r in [&p.chosen, &p.rejected] {
                let segs = r.segments().unwrap();
                let got: Vec<[u8; 5]> = segs.iter().map(|s| s.scores.unwrap().to_array()).collect();
                assert_eq!(got, expected_scores(segs));
                let raw: Vec<u8> = segs.iter().map(|s| crate::test_server::mock_rating("completeness", &s.text)).collect();
                let mut m = raw.clone();
                corrections += enforce_monotone(&mut m);
            }
        }
        assert_eq!(
            stats[&Aspect::Completeness].corrections,
            corrections + {
                // The two failed pairs' completeness judgements succeeded too; they count.
                let all = read_pairs(&input);
                [6usize, 7]
                    .iter()
                    .map(|&i| {
                        let p = &all[i];
                        [&p.chosen, &p.rejected]
                            .iter()
                            .map(|r| {
                                let mut v: Vec<u8> =
                                    segments_of(r).iter().map(|s| crate::test_server::mock_rating("completeness", &s.text)).collect();
                                enforce_monotone(&mut v)
                            })
                            .sum::<usize>()
                    })
                    .sum::<usize>()
            }
        );
        let failed_file = std::fs::read_to_string(job.failed_out.as_ref().unwrap()).unwrap();
        assert_eq!(failed_file.lines().count(), 2);

        // A rerun sends only the failed judgements again: clarity of line 7
        // (first + repair) and helpfulness of line 8 (1 + 2 retries).
        server.reset_stats();
        let s2 = annotate_file(&job, &opts(server.base_url())).unwrap();
        assert_eq!(server.stats().requests, 2 + 3);
        assert_eq!(s2.pairs_written, 8);
        let cached: usize = s2.aspects.iter().map(|(_, st)| st.cached).sum();
        assert_eq!(cached, 50 - 2);
        assert_eq!(read_pairs(&job.output), out);
    }

    #[test]
    fn unreachable_or_dead_server_stops_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, (0..6).map(|i| pair_line(i, "") + "\n").collect::<String>()).unwrap();
        let job = AnnotateJob { input, output: dir.path().join("o.jsonl"), cache: None, failed_out: None, route: Route::Direct };
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut o = opts(&format!("http://127.0.0.1:{port}/v1"));
        o.judge.policy.max_retries = 1;
        let t = std::time::Instant::now();
        let e = format!("{:#}", annotate_file(&job, &o).unwrap_err());
        assert!(e.contains("is the server running"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!job.output.exists());

        // A server that answers 500 to everything: stop after N give-ups in a row.
        let server = MockJudge::start(MockConfig::default());
        let input = dir.path().join("bad.jsonl");
        std::fs::write(&input, (0..6).map(|i| pair_line(i, "[[fault:500always]]") + "\n").collect::<String>()).unwrap();
        let mut o = opts(server.base_url());
        o.judge.policy.max_retries = 0;
        o.judge.policy.max_consecutive_failures = 5;
        let e = format!("{:#}", annotate_file(&AnnotateJob { input, ..job }, &o).unwrap_err());
        assert!(e.contains("in a row failed"), "{e}");
        assert!(server.stats().requests < 30, "the run went on after the server was judged down");
    }

    #[test]
    fn atomic_write_plain_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["o.jsonl", "o.jsonl.gz"] {
            let p = dir.path().join("sub").join(name);
            write_atomic(&p, &[serde_json::json!({"a": 1}), serde_json::json!({"b": 2})]).unwrap();
            let lines: Vec<String> = dpo2d_data::io::jsonl_lines(&p).unwrap().map(|l| l.unwrap().text).collect();
            assert_eq!(lines, vec![r#"{"a":1}"#, r#"{"b":2}"#]);
            assert_eq!(std::fs::read(&p).unwrap().starts_with(&[0x1f, 0x8b]), name.ends_with(".gz"));
        }
        // Only the two outputs remain: no temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path().join("sub")).unwrap().count(), 2);
    }

    #[test]
    fn partial_aspects_need_existing_scores_and_dry_run_sends_nothing() {
        let server = MockJudge::start(MockConfig::default());
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, pair_line(1, "") + "\n").unwrap();
        let job =
            AnnotateJob { input: input.clone(), output: dir.path().join("o.jsonl"), cache: None, failed_out: None, route: Route::Direct };
        let mut o = opts(server.base_url());
        o.aspects = vec![Aspect::Safety];
        let s = annotate_file(&job, &o).unwrap();
        assert_eq!(s.pairs_written, 0);
        assert!(s.failed[0].errors["input"].contains("--aspects"));
        assert_eq!(server.stats().requests, 0);

        // Annotate fully, then re-annotate safety only on the scored output.
        let s = annotate_file(&job, &opts(server.base_url())).unwrap();
        assert_eq!(s.pairs_written, 1);
        let job2 = AnnotateJob { input: job.output.clone(), output: dir.path().join("o2.jsonl"), ..job.clone() };
        server.reset_stats();
        let s2 = annotate_file(&job2, &o).unwrap();
        assert_eq!(s2.pairs_written, 1);
        assert_eq!(server.stats().requests, 1);
        assert_eq!(read_pairs(&job2.output), read_pairs(&job.output));

        let dry = AnnotateJob { route: Route::DryRun, output: dir.path().join("never.jsonl"), ..job };
        server.reset_stats();
        let s3 = annotate_file(&dry, &opts(server.base_url())).unwrap();
        assert_eq!(s3.dry_run_requests, 5);
        assert_eq!(server.stats().requests, 0);
        assert!(!dry.output.exists());
    }
}
