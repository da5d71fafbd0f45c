//! The decoder: one thread owns the model and answers queued requests in
//! batches. Whatever is waiting when a batch starts (up to `max_batch_rows`
//! rows, `n` rows per request) is prefilled and decoded together; requests
//! that arrive meanwhile wait for the next batch. Each request gets its text
//! back through its own channel, piece by piece when it streams.

use dpo2d_model::generate::{decode_rows, find_stop, row_seed, FinishReason, GenerationConfig, Row};
use dpo2d_model::llama::CausalLM;
use dpo2d_model::source::TextSide;
use std::panic::AssertUnwindSafe;
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
    pub events: UnboundedSender<Event>,
}

#[derive(Debug)]
pub enum Event {
    /// More text of choice `index`.
    Delta { index: usize, text: String },
    /// Choice `index` is complete: its whole text (stop string cut off).
    Done { index: usize, text: String, finish: FinishReason, tokens: usize },
    /// The batch failed; the request gets a server error.
    Failed(String),
}

pub struct Engine {
    pub model: CausalLM,
    pub text: Arc<TextSide>,
    /// Tokens that end an answer (`TextSide::stop_token_ids`, found once).
    pub eos: Vec<u32>,
    pub max_batch_rows: usize,
    /// How long the first request of a batch waits for others to join it.
    pub batch_wait: Duration,
    pub stats: Arc<Stats>,
}

/// Counters shared with the HTTP side (admission, `/health`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests queued or decoding.
    pub pending: AtomicUsize,
    /// Batches decoded so far, and their rows.
    pub batches: AtomicUsize,
    pub rows: AtomicUsize,
}

impl Engine {
    /// Answers jobs until every sender is gone (the server has shut down).
    pub fn run(&self, jobs: Receiver<Job>) {
        let mut carry: Option<Job> = None;
        loop {
            let first = match carry.take() {
                Some(j) => j,
                None => match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                },
            };
            let mut batch = vec![first];
            let deadline = Instant::now() + self.batch_wait;
            while rows_of(&batch) < self.max_batch_rows {
                match jobs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(j) if rows_of(&batch) + j.cfg.num_return_sequences > self.max_batch_rows => {
                        carry = Some(j);
                        break;
                    }
                    Ok(j) => batch.push(j),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            let taken = batch.len();
            // Skip requests whose client has already gone.
            batch.retain(|j| !j.events.is_closed());
            self.stats.pending.fetch_sub(taken - batch.len(), Ordering::SeqCst);
            if !batch.is_empty() {
                self.answer(&batch);
                tracing::debug!("decoded a batch of {} request(s), {} row(s)", batch.len(), rows_of(&batch));
            }
        }
    }

    /// The batch is decoded (or failed): count it, and stop counting its
    /// requests as pending, before they get their answers, so that a client
    /// that asks again as soon as it is answered is not refused for a full
    /// queue, and `/health` already counts the batch it was answered in.
    fn finished(&self, batch: &[Job]) {
        self.stats.batches.fetch_add(1, Ordering::SeqCst);
        self.stats.rows.fetch_add(rows_of(batch), Ordering::SeqCst);
        self.stats.pending.fetch_sub(batch.len(), Ordering::SeqCst);
    }

    /// Decodes one batch; a failure (or a panic) fails its requests, not the server.
    fn answer(&self, batch: &[Job]) {
        let mut owners = vec![]; // (job, choice index) of each row
        for (j, job) in batch.iter().enumerate() {
            owners.extend((0..job.cfg.num_return_sequences).map(|s| (j, s)));
        }
        let rows: Vec<Row> =
            owners.iter().map(|&(j, s)| Row::new(&batch[j].prompt, &batch[j].cfg, row_seed(batch[j].cfg.seed, 0, s as u64))).collect();
        let mut streams: Vec<TextStream> = owners.iter().map(|&(j, _)| TextStream::new(&batch[j].cfg.stop)).collect();
        let tok = &self.text.tokenizer;
        let mut on_token = |row: usize, tokens: &[u32]| -> bool {
            let (j, index) = owners[row];
            let job = &batch[j];
            if job.events.is_closed() {
                return true;
            }
            if !job.stream && job.cfg.stop.is_empty() {
                return false;
            }
            let Ok(text) = tok.decode(tokens, true) else { return false };
            let (delta, stopped) = streams[row].advance(&text, false);
            if job.stream && !delta.is_empty() {
                let _ = job.events.send(Event::Delta { index, text: delta });
            }
            stopped
        };
        let decoded =
            std::panic::catch_unwind(AssertUnwindSafe(|| decode_rows(&self.model, rows, &self.eos, tok.pad_token_id(), &mut on_token)));
        self.finished(batch);
        let raw = match decoded {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => return fail(batch, &format!("generation failed: {e:#}")),
            Err(_) => return fail(batch, "generation failed (internal error)"),
        };
        for ((&(j, index), c), stream) in owners.iter().zip(raw).zip(streams.iter_mut()) {
            let job = &batch[j];
            let full = tok.decode(&c.tokens, true).unwrap_or_default();
            let (delta, _) = stream.advance(&full, true);
            if job.stream && !delta.is_empty() {
                let _ = job.events.send(Event::Delta { index, text: delta });
            }
            let text = stream.emitted_text(&full);
            let _ = job.events.send(Event::Done { index, text, finish: c.finish, tokens: c.tokens.len() });
        }
    }
}

fn rows_of(batch: &[Job]) -> usize {
    batch.iter().map(|j| j.cfg.num_return_sequences).sum()
}

fn fail(batch: &[Job], msg: &str) {
    tracing::error!("{msg}");
    for job in batch {
        let _ = job.events.send(Event::Failed(msg.to_string()));
    }
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
