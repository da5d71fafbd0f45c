//! The decoder: one thread owns the model and decodes every admitted row
//! one token per step (continuous batching). A request that arrives while
//! others decode is prefilled a chunk of its prompt per step, between their
//! steps, then joins the running rows; a row leaves as soon as it is done,
//! so a short answer never waits for a long one. Requests admitted together
//! run the prompt prefix they share once; rows are admitted while they fit
//! the row and KV-cache budgets. Each row may carry a
//! grammar (structured outputs) that masks its logits, and may report the
//! log-probabilities of its tokens. Each request gets its text back through
//! its own channel, piece by piece when it streams.

use crate::constraint::Constraint;
use anyhow::Result;
use dpo2d_model::generate::{argmax, find_stop, row_seed, sample, DecodeBatch, FinishReason, GenerationConfig, Prefill};
use dpo2d_model::llama::CausalLM;
use dpo2d_model::source::TextSide;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// One request for the decoder: `cfg.num_return_sequences` rows of one prompt.
pub struct Job {
    pub prompt: Vec<u32>,
    pub cfg: GenerationConfig,
    /// Send text as it is decoded (else only the final text).
    pub stream: bool,
    /// The grammar every row of the request must follow (structured outputs).
    pub constraint: Option<Constraint>,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

/// A decoded token's log-probability, and the most likely tokens at its
/// place (OpenAI's `logprobs.content` entry), under the distribution it
/// was drawn from: the model's, restricted to what a grammar allows.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug)]
pub enum Event {
    /// More text of choice `index`, with the log-probabilities of the tokens decoded since the last piece.
    Delta { index: usize, text: String, logprobs: Vec<TokenLogprob> },
    /// Choice `index` is complete: its whole text (stop string cut off), and
    /// the log-probabilities not sent with a piece yet.
    Done { index: usize, text: String, finish: FinishReason, tokens: usize, logprobs: Vec<TokenLogprob> },
    /// Decoding failed; the request gets a server error.
    Failed(String),
}

pub struct Engine {
    pub model: CausalLM,
    pub text: Arc<TextSide>,
    /// Tokens that end an answer (`TextSide::stop_token_ids`, found once).
    pub eos: Vec<u32>,
    /// Rows decoding (or being prefilled) at once.
    pub max_batch_rows: usize,
    /// Rows x positions the KV cache of the rows in flight may hold.
    pub kv_positions: usize,
    /// How long the first request to reach an idle decoder waits for others
    /// to be prefilled with it.
    pub batch_wait: Duration,
    pub stats: Arc<Stats>,
}

/// Counters shared with the HTTP side (admission, `/health`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests queued or decoding.
    pub pending: AtomicUsize,
    /// Groups of requests prefilled together, and their rows.
    pub batches: AtomicUsize,
    pub rows: AtomicUsize,
}

/// Prompt columns a prefill runs per step while other rows decode: small
/// enough that their next tokens are not held up for long.
const PREFILL_COLUMNS_BESIDE_DECODING: usize = 128;

/// Rows join a running batch once 1/JOIN_SHARE of it is free (or all that wait fit).
const JOIN_SHARE: usize = 2;
/// Attention scores one prefill pass may hold when nothing else decodes.
const PREFILL_SCORES: usize = 1 << 27;

/// What a request's rows share: where their events go, and how many are left.
struct Request {
    job: Job,
    rows_left: std::cell::Cell<usize>,
}

/// One row being decoded: a choice of a request.
struct RowState {
    req: Rc<Request>,
    index: usize,
    rng: StdRng,
    stream: TextStream,
    tokens: Vec<u32>,
    constraint: Option<Constraint>,
    /// Log-probabilities of the tokens decoded since the last piece sent.
    logprobs: Vec<TokenLogprob>,
}

/// Cache positions a request's rows may need: its prompt and answer.
fn span(job: &Job) -> usize {
    job.prompt.len() + job.cfg.max_new_tokens
}

impl RowState {
    fn new(req: &Rc<Request>, index: usize) -> Self {
        let job = &req.job;
        RowState {
            req: req.clone(),
            index,
            rng: StdRng::seed_from_u64(row_seed(job.cfg.seed, 0, index as u64)),
            stream: TextStream::new(&job.cfg.stop),
            tokens: vec![],
            constraint: job.constraint.as_ref().map(Constraint::fork),
            logprobs: vec![],
        }
    }

    fn pick(&mut self) -> Pick<'_> {
        let RowState { req, rng, constraint, logprobs, .. } = self;
        Pick { cfg: &req.job.cfg, top_logprobs: req.job.logprobs, rng, constraint: constraint.as_mut(), logprobs }
    }

    /// Plain greedy decoding: the device's argmax serves it.
    fn plain_greedy(&self) -> bool {
        self.req.job.cfg.is_greedy() && self.constraint.is_none() && self.req.job.logprobs.is_none()
    }
}

/// The decoder's state between steps.
#[derive(Default)]
struct Work {
    waiting: VecDeque<Job>,
    prefill: Option<(Prefill, Vec<RowState>)>,
    batch: DecodeBatch,
    rows: Vec<RowState>,
}

impl Work {
    fn idle(&self) -> bool {
        self.waiting.is_empty() && self.prefill.is_none() && self.rows.is_empty()
    }

    fn rows_in_flight(&self) -> usize {
        self.rows.len() + self.prefill.as_ref().map(|(_, r)| r.len()).unwrap_or(0)
    }

    /// The longest span of the rows in flight: the batch's cache lines
    /// their ends up, so every row takes about that many positions.
    fn span_in_flight(&self) -> usize {
        let prefilling = self.prefill.iter().flat_map(|(_, r)| r);
        self.rows.iter().chain(prefilling).map(|r| span(&r.req.job)).max().unwrap_or(0)
    }
}

impl Engine {
    /// Answers jobs until every sender is gone (the server has shut down)
    /// and nothing is left to decode.
    pub fn run(&self, jobs: Receiver<Job>) {
        let mut work = Work::default();
        loop {
            if !self.collect(&jobs, &mut work) {
                return;
            }
            self.admit(&mut work);
            if let Err(e) = self.prefill_step(&mut work) {
                let (_, rows) = work.prefill.take().expect("a prefill failed");
                self.fail_rows(rows, &format!("generation failed: {e:#}"));
            }
            if !work.rows.is_empty() {
                if let Err(e) = self.decode_step(&mut work) {
                    let rows = std::mem::take(&mut work.rows);
                    work.batch = DecodeBatch::default();
                    self.fail_rows(rows, &format!("generation failed: {e:#}"));
                }
            }
        }
    }

    /// Takes what has arrived; waits when there is nothing to do (and, for
    /// the first request to an idle decoder, up to `batch_wait` for others).
    /// False once the server has shut down and nothing is left.
    fn collect(&self, jobs: &Receiver<Job>, work: &mut Work) -> bool {
        if work.idle() {
            match jobs.recv() {
                Ok(j) => work.waiting.push_back(j),
                Err(_) => return false,
            }
            let deadline = Instant::now() + self.batch_wait;
            while work.waiting.iter().map(|j| j.cfg.num_return_sequences).sum::<usize>() < self.max_batch_rows {
                match jobs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(j) => work.waiting.push_back(j),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        while let Ok(j) = jobs.try_recv() {
            work.waiting.push_back(j);
        }
        true
    }

    /// Starts prefilling the waiting requests that fit beside the rows in flight.
    fn admit(&self, work: &mut Work) {
        if work.prefill.is_some() {
            return;
        }
        // A prefill beside decoding costs about one more pass over the
        // weights: while rows decode, wait until a good share of the batch
        // (or every waiting row) is free, so that rows join in groups.
        let waiting: usize = work.waiting.iter().map(|j| j.cfg.num_return_sequences).sum();
        let free = self.max_batch_rows.saturating_sub(work.rows_in_flight());
        if !work.rows.is_empty() && free < waiting.min(self.max_batch_rows / JOIN_SHARE).max(1) {
            return;
        }
        let mut taken: Vec<Job> = vec![];
        let (mut rows, mut longest) = (work.rows_in_flight(), work.span_in_flight());
        while let Some(j) = work.waiting.front() {
            let n = j.cfg.num_return_sequences;
            let fits = rows + n <= self.max_batch_rows && (rows + n) * longest.max(span(j)) <= self.kv_positions;
            // The first request of an idle decoder runs whatever its size.
            let alone = rows == 0 && taken.is_empty();
            if !(fits || alone) {
                break;
            }
            let j = work.waiting.pop_front().expect("a waiting job");
            // A client that has gone needs no answer.
            if j.events.is_closed() {
                self.stats.pending.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            rows += n;
            longest = longest.max(span(&j));
            taken.push(j);
        }
        if taken.is_empty() {
            return;
        }
        let states: Vec<RowState> = taken
            .into_iter()
            .flat_map(|job| {
                let n = job.cfg.num_return_sequences;
                let req = Rc::new(Request { job, rows_left: std::cell::Cell::new(n) });
                (0..n).map(move |i| RowState::new(&req, i)).collect::<Vec<_>>()
            })
            .collect();
        let prompts: Vec<&[u32]> = states.iter().map(|r| r.req.job.prompt.as_slice()).collect();
        let max_new = states.iter().map(|r| r.req.job.cfg.max_new_tokens).max().unwrap_or(0);
        match Prefill::sharing_prefix(&self.model, &prompts, self.text.tokenizer.pad_token_id(), max_new) {
            Ok(p) => {
                self.stats.batches.fetch_add(1, Ordering::SeqCst);
                self.stats.rows.fetch_add(states.len(), Ordering::SeqCst);
                work.prefill = Some((p, states));
            }
            Err(e) => self.fail_rows(states, &format!("generation failed: {e:#}")),
        }
    }

    /// Runs one chunk of the prefill (all of it when nothing else decodes);
    /// a finished prefill's rows join the running ones.
    fn prefill_step(&self, work: &mut Work) -> Result<()> {
        let Some((p, _)) = work.prefill.as_mut() else { return Ok(()) };
        let columns = if work.rows.is_empty() { p.chunk_within(&self.model, PREFILL_SCORES) } else { PREFILL_COLUMNS_BESIDE_DECODING };
        guarded(|| p.advance(&self.model, columns))?;
        if p.is_done() {
            let (p, rows) = work.prefill.take().expect("a prefill");
            guarded(|| work.batch.join(p))?;
            work.rows.extend(rows);
        }
        Ok(())
    }

    /// One token for every running row; finished rows leave.
    fn decode_step(&self, work: &mut Work) -> Result<()> {
        let next = guarded(|| self.pick(work))?;
        let mut keep = vec![];
        let mut tokens = vec![];
        let rows = std::mem::take(&mut work.rows);
        let mut still = vec![];
        for (i, (mut row, t)) in rows.into_iter().zip(next).enumerate() {
            match self.advance_row(&mut row, t) {
                Some(finish) => self.finish_row(row, finish),
                None => {
                    keep.push(i);
                    tokens.push(t);
                    still.push(row);
                }
            }
        }
        work.rows = still;
        guarded(|| {
            work.batch.step(&self.model, &keep, &tokens)?;
            work.batch.trim()
        })
    }

    /// The next token of every running row: the device's argmax when every
    /// row decodes greedily without a grammar or log-probs, else row by row.
    fn pick(&self, work: &mut Work) -> Result<Vec<u32>> {
        let logits = work.batch.logits(&self.model)?;
        if work.rows.iter().all(RowState::plain_greedy) {
            return Ok(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?);
        }
        let all = logits.to_vec2::<f32>()?;
        // Rows pick on every core: sampling sorts the vocabulary and a grammar
        // computes its mask, each a row's own work.
        let picks: Vec<Pick> = work.rows.iter_mut().map(RowState::pick).collect();
        picks.into_par_iter().zip(all).map(|(p, mut l)| p.next_token(&mut l)).collect()
    }

    /// Takes token `t` into the row; `Some` when the row is done.
    fn advance_row(&self, row: &mut RowState, t: u32) -> Option<FinishReason> {
        let job = &row.req.job;
        if self.eos.contains(&t) {
            return Some(FinishReason::Eos);
        }
        row.tokens.push(t);
        if job.events.is_closed() {
            return Some(FinishReason::Stop);
        }
        if let Some(c) = row.constraint.as_mut() {
            if c.consume(t).is_err() || c.is_stopped() {
                return Some(FinishReason::Stop);
            }
        }
        if job.stream || !job.cfg.stop.is_empty() {
            let text = self.text.tokenizer.decode(&row.tokens, true).unwrap_or_default();
            let (delta, stopped) = row.stream.advance(&text, false);
            if job.stream && !delta.is_empty() {
                let logprobs = std::mem::take(&mut row.logprobs);
                let _ = job.events.send(Event::Delta { index: row.index, text: delta, logprobs });
            }
            if stopped {
                return Some(FinishReason::Stop);
            }
        }
        (row.tokens.len() >= job.cfg.max_new_tokens).then_some(FinishReason::Length)
    }

    /// Sends a finished row's last piece and its whole text; the request is
    /// counted as answered before its last row's answer goes out, so that a
    /// client that asks again at once is not refused for a full queue.
    fn finish_row(&self, mut row: RowState, finish: FinishReason) {
        let job = &row.req.job;
        let full = self.text.tokenizer.decode(&row.tokens, true).unwrap_or_default();
        let (delta, _) = row.stream.advance(&full, true);
        let mut logprobs = std::mem::take(&mut row.logprobs);
        if job.stream && !delta.is_empty() {
            let _ = job.events.send(Event::Delta { index: row.index, text: delta, logprobs: std::mem::take(&mut logprobs) });
        }
        let text = row.stream.emitted_text(&full);
        let left = row.req.rows_left.get() - 1;
        row.req.rows_left.set(left);
        if left == 0 {
            self.stats.pending.fetch_sub(1, Ordering::SeqCst);
        }
        let _ = job.events.send(Event::Done { index: row.index, text, finish, tokens: row.tokens.len(), logprobs });
    }

    /// Fails the requests of `rows` (each once), not the server.
    fn fail_rows(&self, rows: Vec<RowState>, msg: &str) {
        tracing::error!("{msg}");
        for row in rows {
            let left = row.req.rows_left.get();
            if left == 0 {
                continue;
            }
            row.req.rows_left.set(0);
            self.stats.pending.fetch_sub(1, Ordering::SeqCst);
            let _ = row.req.job.events.send(Event::Failed(msg.to_string()));
        }
    }
}

/// Runs `f`, turning a panic into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(anyhow::anyhow!("internal error")))
}

/// What choosing one row's next token needs, borrowed from the row apart
/// from its request handle, which stays on the decoder's thread.
struct Pick<'a> {
    cfg: &'a GenerationConfig,
    top_logprobs: Option<usize>,
    rng: &'a mut StdRng,
    constraint: Option<&'a mut Constraint>,
    logprobs: &'a mut Vec<TokenLogprob>,
}

impl Pick<'_> {
    /// The row's next token from its logits: masked by its grammar, greedy or
    /// sampled with its own settings and generator, its log-probability noted
    /// when asked for.
    fn next_token(self, logits: &mut [f32]) -> Result<u32> {
        if let Some(c) = self.constraint {
            c.mask(logits)?;
        }
        let t = if self.cfg.is_greedy() { argmax(logits) } else { sample(logits, self.cfg, self.rng) };
        if let Some(top) = self.top_logprobs {
            self.logprobs.push(token_logprob(logits, t, top));
        }
        Ok(t)
    }
}

/// `t`'s log-probability under `logits` (temperature 1) and the `top` most likely tokens.
fn token_logprob(logits: &[f32], t: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().filter(|x| x.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let z: f64 = logits.iter().filter(|x| x.is_finite()).map(|&x| ((x - max) as f64).exp()).sum();
    let lp = |x: f32| ((x - max) as f64 - z.ln()) as f32;
    let mut best: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
    let k = top.min(best.len());
    if k > 0 {
        best.select_nth_unstable_by(k - 1, |&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        best.truncate(k);
        best.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
    } else {
        best.clear();
    }
    TokenLogprob { token: t, logprob: lp(logits[t as usize]), top: best.into_iter().map(|i| (i, lp(logits[i as usize]))).collect() }
}

/// Turns the growing decoded text of one row into safe-to-send pieces:
/// nothing after a stop string, nothing that could still become the start
/// of one, and no half-decoded character (U+FFFD at the end).
#[derive(Debug)]
pub struct TextStream {
    stop: Vec<String>,
    /// Bytes of the text already handed out.
    sent: usize,
    /// Where a stop string begins, once one appeared.
    cut: Option<usize>,
}

impl TextStream {
    pub fn new(stop: &[String]) -> Self {
        TextStream { stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(), sent: 0, cut: None }
    }

    /// The new piece of `text` that can be sent now, and whether a stop
    /// string has appeared. `last` releases everything held back.
    pub fn advance(&mut self, text: &str, last: bool) -> (String, bool) {
        if self.cut.is_none() {
            self.cut = find_stop(text, &self.stop);
        }
        let mut end = match self.cut {
            Some(c) => c,
            None if last => text.len(),
            None => {
                let trimmed = text.trim_end_matches('\u{FFFD}').len();
                // Hold back a tail that a stop string could still begin with.
                let hold = self.stop.iter().map(|s| partial_suffix(&text[..trimmed], s)).max().unwrap_or(0);
                trimmed - hold
            }
        };
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        // Decoding more tokens can rewrite the last characters (a merge
        // across tokens): never go back on what was sent.
        if end <= self.sent || !text.is_char_boundary(self.sent) {
            return (String::new(), self.cut.is_some());
        }
        let piece = text[self.sent..end].to_string();
        self.sent = end;
        (piece, self.cut.is_some())
    }

    /// The complete answer: `text` up to the stop string.
    pub fn emitted_text(&self, text: &str) -> String {
        let end = self.cut.unwrap_or(text.len()).min(text.len());
        text[..end].to_string()
    }
}

/// Length of the longest end of `text` that is a proper start of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stop: &[&str], steps: &[&str]) -> (Vec<String>, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&stop);
        let mut out = vec![];
        let mut stopped = false;
        for (i, t) in steps.iter().enumerate() {
            let (d, st) = s.advance(t, i + 1 == steps.len());
            out.push(d);
            stopped = st;
            if st {
                break;
            }
        }
        (out, stopped)
    }

    #[test]
    fn holds_back_what_may_start_a_stop_string() {
        let (out, stopped) = feed(&["END"], &["Hello", "Hello E", "Hello EN", "Hello ENX", "Hello ENX world"]);
        assert_eq!(out.concat(), "Hello ENX world");
        assert_eq!(out[1], " ");
        assert!(!stopped);
        let (out, stopped) = feed(&["END"], &["Hi E", "Hi EN", "Hi END and more"]);
        assert_eq!(out.concat(), "Hi ");
        assert!(stopped);
    }

    #[test]
    fn never_sends_half_a_character_or_takes_text_back() {
        let (out, _) = feed(&[], &["caf\u{FFFD}", "café", "café!"]);
        assert_eq!(out, vec!["caf", "é", "!"]);
        let mut s = TextStream::new(&[]);
        assert_eq!(s.advance("abc", false).0, "abc");
        assert_eq!(s.advance("ab", false).0, "");
        assert_eq!(s.advance("abcd", true).0, "d");
    }

    #[test]
    fn final_text_is_cut_at_the_stop_string() {
        let mut s = TextStream::new(&["\n\n".to_string(), "###".to_string()]);
        let _ = s.advance("one ### two\n\n", false);
        assert_eq!(s.emitted_text("one ### two\n\n three"), "one ");
    }
}
