//! Annotation through batches: the requests not yet in the cache go out as
//! Batch API files (or one request file to run elsewhere), and the answers
//! come back through the same parser and cache as direct calls.
//!
//! Each request's `custom_id` is its cache key, so results map back in any
//! order and a request is never in two open batches. The ids of every
//! submitted batch are kept in the cache until its results are read: a
//! killed run polls them again instead of submitting anew. Lines that
//! failed or expired go into a follow-up batch (at most [`MAX_FOLLOW_UPS`]).

use crate::batch_api::{read_results, request_line, split, BatchApi, BatchLimits, LineResult};
use crate::cache::cache_key;
use crate::prompt::{Aspect, ChatRequest};
use crate::run::{cached, request_body, settle, Ctx, Outcome, Prepared, Route};
use anyhow::{bail, Context, Result};
use dpo2d_ui::ProgressBar;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Follow-up batches for the lines that failed, after the first.
pub const MAX_FOLLOW_UPS: usize = 2;

/// What went through batches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchReport {
    /// Requests sent in batches (or written to the request file).
    pub requests: usize,
    /// Judgements found in the cache, not asked again.
    pub cached: usize,
    /// Batches created by this run, follow-ups included.
    pub submitted: usize,
    /// Batches of an earlier run polled again.
    pub resumed: usize,
    pub follow_ups: usize,
    /// Result lines that failed (retried in a follow-up, or reported).
    pub failed_lines: usize,
    /// The request file written (`--batch-write`).
    pub written: Option<PathBuf>,
}

impl fmt::Display for BatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch: {} request(s) in {} batch(es) submitted, {} resumed, {} follow-up(s); {} failed line(s)",
            self.requests, self.submitted, self.resumed, self.follow_ups, self.failed_lines
        )
    }
}

pub(crate) enum BatchDone {
    Results(BTreeMap<(usize, Aspect), Outcome>, BatchReport),
    /// Only the request file was written.
    Written(BatchReport),
}

/// The requests still to ask, by `custom_id`, with the judgements waiting on each.
struct Pending {
    requests: BTreeMap<String, (ChatRequest, Vec<(usize, Aspect)>)>,
}

/// Runs the judgements of `tasks` along `route` (a batch route).
pub(crate) async fn drive(
    ctx: Arc<Ctx>,
    ready: &[Arc<Prepared>],
    tasks: Vec<(usize, Aspect)>,
    route: &Route,
    bar: ProgressBar,
) -> Result<BatchDone> {
    let mut results = BTreeMap::new();
    let mut report = BatchReport::default();
    let mut pending = Pending { requests: BTreeMap::new() };
    // Batches have no fallback: the first answer form is the one asked.
    let structured = ctx.formats.forms()[0];
    for (i, a) in tasks {
        if let Some(judgement) = cached(&ctx, &ready[i], a).await.map_err(anyhow::Error::msg)? {
            results.insert((i, a), Outcome::Ok { judgement, cached: true });
            report.cached += 1;
            bar.inc(1);
            continue;
        }
        let req = ctx.request(&ready[i], a, structured);
        let key = cache_key(&ctx.judge.model, &request_body(&req));
        pending.requests.entry(key).or_insert_with(|| (req, Vec::new())).1.push((i, a));
    }
    match route {
        Route::WriteRequests(path) => {
            let lines: Vec<String> = pending.requests.iter().map(|(id, (req, _))| request_line(id, req)).collect();
            dpo2d_fs::write_file(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>())?;
            report.requests = lines.len();
            report.written = Some(path.clone());
            return Ok(BatchDone::Written(report));
        }
        Route::ReadResults(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let answers = read_results(&text).with_context(|| format!("reading {}", path.display()))?;
            report.requests = answers.len();
            let failed = take_answers(&ctx, ready, &mut pending, answers, &mut results, &bar, false).await?;
            report.failed_lines = failed.len();
            for (id, why) in failed {
                fail(&mut pending, &id, &why, &mut results, &bar);
            }
            let missing: Vec<String> = pending.requests.keys().cloned().collect();
            for id in missing {
                fail(&mut pending, &id, &format!("not in the results file {}", path.display()), &mut results, &bar);
            }
        }
        Route::Batch { poll_interval, limits } => {
            let api = BatchApi::new(&ctx.judge.base_urls[0], ctx.judge.api_key.clone(), ctx.judge.policy.clone())?;
            let polled = Poll { ctx: &ctx, ready, api: &api, limits: *limits, every: *poll_interval, bar: &bar };
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::select! {
                r = polled.run(&mut pending, &mut results, &mut report) => r?,
                _ = ctrl_c => bail!(
                    "interrupted: the open batches stay at the server and are listed in {}; rerun the same command to go on polling them \
                     (nothing is submitted twice)",
                    ctx.cache.path().display()
                ),
            }
        }
        Route::Direct | Route::DryRun => unreachable!("not a batch route"),
    }
    Ok(BatchDone::Results(results, report))
}

/// Marks the judgements waiting on request `id` as failed.
fn fail(pending: &mut Pending, id: &str, why: &str, results: &mut BTreeMap<(usize, Aspect), Outcome>, bar: &ProgressBar) {
    if let Some((_, waiting)) = pending.requests.remove(id) {
        for k in waiting {
            results.insert(k, Outcome::Failed(why.to_string()));
            bar.inc(1);
        }
    }
}

/// Settles the answered lines that are still pending (repairs sent
/// directly when `may_repair`); returns the lines that failed, by id.
async fn take_answers(
    ctx: &Arc<Ctx>,
    ready: &[Arc<Prepared>],
    pending: &mut Pending,
    answers: Vec<(String, LineResult)>,
    results: &mut BTreeMap<(usize, Aspect), Outcome>,
    bar: &ProgressBar,
    may_repair: bool,
) -> Result<Vec<(String, String)>> {
    let mut failed = Vec::new();
    for (id, line) in answers {
        if !pending.requests.contains_key(&id) {
            continue; // answered before, or not a request of this run
        }
        let completion = match line {
            LineResult::Answer(c) => c,
            LineResult::Failed(why) => {
                failed.push((id, why));
                continue;
            }
        };
        let stats = &ctx.client.stats;
        stats.successes.fetch_add(1, Ordering::Relaxed);
        stats.prompt_tokens.fetch_add(completion.prompt_tokens, Ordering::Relaxed);
        stats.completion_tokens.fetch_add(completion.completion_tokens, Ordering::Relaxed);
        let (req, waiting) = pending.requests.remove(&id).expect("checked above");
        let (i, a) = waiting[0];
        let outcome = settle(ctx, &ready[i], a, req, completion, may_repair).await;
        if let Outcome::Fatal(m) = &outcome {
            bail!("stopping: {m}");
        }
        for k in waiting {
            results.insert(k, outcome.clone());
            bar.inc(1);
        }
    }
    Ok(failed)
}

/// The Batch API loop: resume the open batches, submit the rest, poll.
struct Poll<'a> {
    ctx: &'a Arc<Ctx>,
    ready: &'a [Arc<Prepared>],
    api: &'a BatchApi,
    limits: BatchLimits,
    every: Duration,
    bar: &'a ProgressBar,
}

impl Poll<'_> {
    async fn run(&self, pending: &mut Pending, results: &mut BTreeMap<(usize, Aspect), Outcome>, report: &mut BatchReport) -> Result<()> {
        let cache = &self.ctx.cache;
        let mut open = cache.open_batches()?;
        report.resumed = open.len();
        let covered: BTreeSet<&String> = open.iter().flat_map(|(_, ids)| ids).collect();
        let fresh: Vec<String> = pending.requests.keys().filter(|k| !covered.contains(k)).cloned().collect();
        open.extend(self.submit(pending, &fresh, report).await?);
        let mut last_error: BTreeMap<String, String> = BTreeMap::new();
        while !open.is_empty() {
            let mut retry = Vec::new();
            let mut still = Vec::new();
            for (id, ids) in open {
                let st = self.api.status(&id).await?;
                if let Some(c) = st.request_counts {
                    self.bar.set_message(format!("| batch {id}: {} ({}/{} done, {} failed)", st.status, c.completed, c.total, c.failed));
                }
                if !st.finished() {
                    still.push((id, ids));
                    continue;
                }
                let mut answers = Vec::new();
                for file in [&st.output_file_id, &st.error_file_id].into_iter().flatten() {
                    answers.extend(
                        read_results(&self.api.content(file).await?).with_context(|| format!("reading the results of batch {id}"))?,
                    );
                }
                let failed = take_answers(self.ctx, self.ready, pending, answers, results, self.bar, true).await?;
                report.failed_lines += failed.len();
                last_error.extend(failed);
                // Lines of the batch with no answer yet (failed, expired, or missing) are asked again.
                let again: Vec<String> = ids.into_iter().filter(|i| pending.requests.contains_key(i)).collect();
                tracing::info!("batch {id} {}: {} line(s) to ask again", st.status, again.len());
                for i in &again {
                    last_error.entry(i.clone()).or_insert_with(|| format!("no answer in batch {id} ({})", st.status));
                }
                retry.extend(again);
                cache.close_batch(&id)?;
            }
            open = still;
            if !retry.is_empty() {
                if report.follow_ups < MAX_FOLLOW_UPS {
                    report.follow_ups += 1;
                    open.extend(self.submit(pending, &retry, report).await?);
                } else {
                    for id in retry {
                        let why = format!("failed in {} batches; last: {}", MAX_FOLLOW_UPS + 1, last_error.get(&id).map_or("", |s| s));
                        fail(pending, &id, &why, results, self.bar);
                    }
                }
            }
            if !open.is_empty() {
                tokio::time::sleep(self.every).await;
            }
        }
        Ok(())
    }

    /// Uploads `ids` as batch files within the limits and starts a batch on
    /// each, recording it in the cache at once.
    async fn submit(&self, pending: &Pending, ids: &[String], report: &mut BatchReport) -> Result<Vec<(String, Vec<String>)>> {
        let lines: Vec<String> = ids.iter().map(|id| request_line(id, &pending.requests[id].0)).collect();
        let mut started = Vec::new();
        for part in split(&lines, self.limits) {
            let text: String = part.iter().map(|&i| format!("{}\n", lines[i])).collect();
            let file = self.api.upload("dpo2d-annotate.jsonl", &text).await?;
            let batch = self.api.create(&file).await?;
            let part_ids: Vec<String> = part.iter().map(|&i| ids[i].clone()).collect();
            self.ctx.cache.add_batch(&batch.id, &part_ids)?;
            tracing::info!("batch {} submitted: {} request(s)", batch.id, part_ids.len());
            report.submitted += 1;
            report.requests += part_ids.len();
            started.push((batch.id, part_ids));
        }
        Ok(started)
    }
}
