//! The rounds and their phases (see the crate documentation).
//!
//! Files of round `n`, under `<output_dir>/round-<n>/`:
//! - `samples.jsonl`: per prompt, the K sampled answers (grows chunk by chunk);
//! - `scored.jsonl`: per prompt, the answers segmented and scored, and each
//!   answer's weighted score (grows chunk by chunk);
//! - `pairs.jsonl`: the 2-D pairs trained on (best answer against worst);
//! - `train/`: the training run (checkpoints, metrics, charts, `final/`);
//! - `round.json`: the round's summary, written last: a round with one is done.
//!
//! Sampling and scoring append whole chunks, so a stopped run keeps every
//! finished chunk; training resumes from its latest checkpoint.

use crate::prompts::PromptRecord;
use crate::sampler::ServerSampler;
use crate::scorer::{Sampled, Scorer};
use anyhow::{bail, Context, Result};
use dpo2d_data::{rank, Pair, Prompt, Response};
use dpo2d_model::generate::{generate_from_ids, row_seed, GenerationConfig};
use dpo2d_model::llama::LoadOptions;
use dpo2d_model::source::LoadedModel;
use dpo2d_model::DeviceSpec;
use dpo2d_train::align::chat_messages;
use dpo2d_train::config::TrainConfig;
use dpo2d_train::trainer::{train, RunOptions};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How answers are sampled (the paper's K = 4, temperature 0.7, top-p 0.8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingSettings {
    /// Answers per prompt (K).
    pub samples_per_prompt: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// Answers decoded together (prompts x samples).
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        Self { samples_per_prompt: 4, temperature: 0.7, top_p: 0.8, max_new_tokens: 256, batch_size: 16, seed: 42 }
    }
}

/// What to run: `train` is the training configuration of every round (its
/// `model` is the starting policy, its `output_dir` the run's directory; each
/// round trains on its own pairs into `round-<n>/train`).
#[derive(Debug, Clone)]
pub struct IterateConfig {
    pub train: TrainConfig,
    pub rounds: usize,
    pub sampling: SamplingSettings,
}

/// The phases of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Sampling,
    Scoring,
    Training,
}

impl Phase {
    /// `sampling`, `scoring` or `training`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Sampling => "sampling",
            Phase::Scoring => "scoring",
            Phase::Training => "training",
        }
    }
}

/// Stop as if interrupted after `after` chunks (sampling, scoring) or
/// updates (training) of `phase` in round `round`; for tests of resume.
#[derive(Debug, Clone, Copy)]
pub struct StopAt {
    pub round: usize,
    pub phase: Phase,
    pub after: usize,
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct IterateRun {
    pub device: DeviceSpec,
    /// The dpo2d cache (fetched models, reference log-probs).
    pub cache_dir: Option<PathBuf>,
    pub progress: bool,
    pub quiet: bool,
    pub stop_at: Option<StopAt>,
    /// Set (by Ctrl-C) to stop after the current chunk or update.
    pub stop_signal: Option<Arc<AtomicBool>>,
    /// Sample through a serving engine instead of dpo2d's own decoder.
    pub sampler: Option<ServerSampler>,
}

/// What a round produced (`round.json`), and what this process did of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: usize,
    /// The policy the round sampled from (and trained from).
    pub started_from: String,
    /// The trained policy: the next round's start.
    pub policy: PathBuf,
    pub prompts: usize,
    pub pairs: usize,
    /// Prompts without a pair: best and worst answers tie, or fewer than two could be scored.
    pub ties: usize,
    /// Mean weighted score of all scored answers, and of the chosen and rejected ones.
    pub mean_score: f64,
    pub chosen_mean_score: f64,
    pub rejected_mean_score: f64,
    /// Prompts sampled and scored, and updates trained, by this process (a
    /// resumed run does only what was missing).
    #[serde(skip)]
    pub sampled_now: usize,
    #[serde(skip)]
    pub scored_now: usize,
    #[serde(skip)]
    pub trained_now: usize,
}

#[derive(Debug, Clone)]
pub struct IterateOutcome {
    pub rounds: Vec<RoundReport>,
    /// Stopped before the last round was done (it resumes where it stopped).
    pub interrupted: bool,
}

/// Run the rounds of `cfg` over `prompts`, scoring with `scorer`; resumes
/// whatever an earlier run in the same directory left unfinished.
pub fn iterate(cfg: &IterateConfig, prompts: &[PromptRecord], scorer: &dyn Scorer, run: &IterateRun) -> Result<IterateOutcome> {
    if prompts.is_empty() {
        bail!("no prompts");
    }
    if cfg.rounds == 0 || cfg.sampling.samples_per_prompt < 2 {
        bail!("iterate needs at least one round and at least 2 samples per prompt");
    }
    let it = Iteration { cfg, prompts, scorer, run };
    it.check_manifest()?;
    let mut policy = cfg.train.model.clone();
    let mut rounds = vec![];
    for n in 1..=cfg.rounds {
        match it.round(n, &policy)? {
            Some(report) => {
                policy = report.policy.display().to_string();
                rounds.push(report);
            }
            None => return Ok(IterateOutcome { rounds, interrupted: true }),
        }
    }
    Ok(IterateOutcome { rounds, interrupted: false })
}

/// Prompts scored per chunk (the unit a stopped scoring phase keeps).
const SCORE_CHUNK: usize = 16;

/// One line of `samples.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SampleRecord {
    index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<serde_json::Value>,
    prompt: Prompt,
    responses: Vec<String>,
}

/// One line of `scored.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ScoredRecord {
    index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<serde_json::Value>,
    prompt: Prompt,
    responses: Vec<Response>,
    /// Each answer's weighted score; `null` for one that could not be scored.
    scores: Vec<Option<f64>>,
    /// Prompts with an answer key (`arithmetic:N`): whether each answer's final answer is right.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    right: Vec<bool>,
}

struct Iteration<'a> {
    cfg: &'a IterateConfig,
    prompts: &'a [PromptRecord],
    scorer: &'a dyn Scorer,
    run: &'a IterateRun,
}

/// What a phase did: finished (having done `n` units of work now) or stopped.
enum Flow {
    Done(usize),
    Stopped,
}

impl Iteration<'_> {
    fn say(&self, s: &str) {
        if !self.run.quiet {
            eprintln!("{s}");
        }
    }

    fn root(&self) -> &Path {
        &self.cfg.train.output_dir
    }

    /// A run continues only with the prompts, sampling and scorer it began
    /// with (more rounds are fine): `iterate.json` records them.
    fn check_manifest(&self) -> Result<()> {
        let manifest = serde_json::json!({
            "model": self.cfg.train.model,
            "prompts": self.prompts,
            "sampling": self.cfg.sampling,
            "scorer": self.scorer.name(),
        });
        let path = self.root().join("iterate.json");
        if path.exists() {
            let old: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{} is not valid JSON", path.display()))?;
            let changed: Vec<&str> =
                ["model", "prompts", "sampling", "scorer"].into_iter().filter(|k| old.get(*k) != manifest.get(*k)).collect();
            if !changed.is_empty() {
                bail!(
                    "{} holds a run with other {}; continue it with the same settings, or use another --output-dir",
                    self.root().display(),
                    changed.join(", ")
                );
            }
            return Ok(());
        }
        dpo2d_fs::write_file(&path, serde_json::to_string_pretty(&manifest)?)
    }

    /// Append a finished chunk's records and count it; true when the run is
    /// to stop after it (Ctrl-C, or [`StopAt`]).
    fn keep_chunk<T: Serialize>(
        &self,
        path: &Path,
        records: &[T],
        bar: &dpo2d_ui::ProgressBar,
        (round, phase): (usize, Phase),
        chunks_now: &mut usize,
    ) -> Result<bool> {
        append(path, records)?;
        bar.inc(records.len() as u64);
        *chunks_now += 1;
        dpo2d_fs::hang_point(&format!("round-{round}/{}:{chunks_now}", phase.name()));
        let stop = self.stop_now(round, phase, *chunks_now);
        if stop {
            bar.finish_and_clear();
        }
        Ok(stop)
    }

    fn stop_now(&self, round: usize, phase: Phase, done: usize) -> bool {
        let signalled = self.run.stop_signal.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        signalled || self.run.stop_at.is_some_and(|s| s.round == round && s.phase == phase && s.after == done)
    }

    /// Round `n` from `policy`: its report, or `None` when stopped.
    fn round(&self, n: usize, policy: &str) -> Result<Option<RoundReport>> {
        let dir = self.root().join(format!("round-{n}"));
        let done = dir.join("round.json");
        if done.exists() {
            let report: RoundReport = serde_json::from_str(&std::fs::read_to_string(&done)?)?;
            self.say(&format!("round {n}: done earlier ({} pairs); policy {}", report.pairs, report.policy.display()));
            return Ok(Some(report));
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let Flow::Done(sampled_now) = self.sample(n, policy, &dir)? else { return Ok(None) };
        let Flow::Done(scored_now) = self.score(n, &dir)? else { return Ok(None) };
        let mut report = self.pair(n, policy, &dir)?;
        let (trained_now, final_model) = match self.train(n, policy, &dir)? {
            (Flow::Done(steps), Some(m)) => (steps, m),
            _ => return Ok(None),
        };
        report.policy = final_model;
        dpo2d_fs::write_file(&done, serde_json::to_string_pretty(&report)?)?;
        self.say(&format!("round {n}: done; policy {}", report.policy.display()));
        Ok(Some(RoundReport { sampled_now, scored_now, trained_now, ..report }))
    }

    /// K answers per prompt, a chunk of prompts per batched decode (or per
    /// round of requests to the sampling server).
    fn sample(&self, n: usize, policy: &str, dir: &Path) -> Result<Flow> {
        let s = &self.cfg.sampling;
        let per_chunk = (s.batch_size / s.samples_per_prompt).max(1);
        let path = dir.join("samples.jsonl");
        let done = read_chunks::<SampleRecord>(&path, per_chunk, self.prompts.len())?;
        if done == self.prompts.len() {
            return Ok(Flow::Done(0));
        }
        if let Some(server) = &self.run.sampler {
            return self.sample_from_server(server, (n, policy, dir), per_chunk, done);
        }
        self.say(&format!(
            "round {n}: sampling {} answers for each of {} prompts from {policy}",
            s.samples_per_prompt,
            self.prompts.len() - done
        ));
        let lm = self.load(policy)?;
        let text = lm.text();
        let context = lm.config.max_position_embeddings;
        let bar = self.sampling_bar(done);
        let mut chunks_now = 0;
        for (c, chunk) in self.prompts.chunks(per_chunk).enumerate().skip(done / per_chunk) {
            let first = c * per_chunk;
            let ids: Vec<Vec<u32>> = chunk.iter().map(|p| text.prompt_ids(&chat_messages(&p.prompt))).collect::<Result<_>>()?;
            let longest = ids.iter().map(|i| i.len()).max().unwrap_or(0);
            if longest + 16 > context {
                bail!("round {n}: a prompt of {longest} tokens leaves no room to answer in the model's context of {context}");
            }
            let cfg = GenerationConfig {
                num_return_sequences: s.samples_per_prompt,
                batch_size: s.batch_size.max(1),
                ..GenerationConfig::sampling(
                    s.max_new_tokens.min(context - longest),
                    s.temperature,
                    s.top_p,
                    row_seed(s.seed, n as u64, c as u64),
                )
            };
            let out = generate_from_ids(&lm.model, &text, &ids, &cfg)?;
            let records: Vec<SampleRecord> = chunk
                .iter()
                .enumerate()
                .map(|(i, p)| SampleRecord {
                    index: first + i,
                    id: p.id.clone(),
                    prompt: p.prompt.clone(),
                    responses: out.iter().filter(|o| o.prompt_index == i).map(|o| o.completion.trim().to_string()).collect(),
                })
                .collect();
            if self.keep_chunk(&path, &records, &bar, (n, Phase::Sampling), &mut chunks_now)? {
                return Ok(Flow::Stopped);
            }
        }
        bar.finish_and_clear();
        Ok(Flow::Done(self.prompts.len() - done))
    }

    /// The sampling progress bar, `done` prompts in.
    fn sampling_bar(&self, done: usize) -> dpo2d_ui::ProgressBar {
        let bar = dpo2d_ui::progress::bar_if(
            self.run.progress,
            self.prompts.len() as u64,
            "{bar:30} {pos}/{len} prompts sampled [{elapsed_precise}<{eta_precise}]",
        );
        bar.set_position(done as u64);
        bar
    }

    /// [`Self::sample`] through an OpenAI-compatible server serving `policy`
    /// (started here when the sampler has a command).
    fn sample_from_server(
        &self,
        server: &ServerSampler,
        (n, policy, dir): (usize, &str, &Path),
        per_chunk: usize,
        done: usize,
    ) -> Result<Flow> {
        let s = &self.cfg.sampling;
        let path = dir.join("samples.jsonl");
        // The engine loads files: the policy as a local path.
        let model = dpo2d_model::fetch::resolve_model(policy, self.run.cache_dir.as_deref())?;
        let model = model.to_string_lossy().into_owned();
        self.say(&format!(
            "round {n}: sampling {} answers for each of {} prompts through {} (policy {model})",
            s.samples_per_prompt,
            self.prompts.len() - done,
            server.base_url
        ));
        let _engine = server.start(&model, &dir.join("sampler.log"))?;
        let bar = self.sampling_bar(done);
        let mut chunks_now = 0;
        for (c, chunk) in self.prompts.chunks(per_chunk).enumerate().skip(done / per_chunk) {
            let answers = server.sample(chunk, s, row_seed(s.seed, n as u64, c as u64), &model)?;
            let records: Vec<SampleRecord> = chunk
                .iter()
                .zip(answers)
                .enumerate()
                .map(|(i, (p, responses))| SampleRecord { index: c * per_chunk + i, id: p.id.clone(), prompt: p.prompt.clone(), responses })
                .collect();
            if self.keep_chunk(&path, &records, &bar, (n, Phase::Sampling), &mut chunks_now)? {
                return Ok(Flow::Stopped);
            }
        }
        bar.finish_and_clear();
        Ok(Flow::Done(self.prompts.len() - done))
    }

    /// Segments and scores every answer, a chunk of prompts at a time.
    fn score(&self, n: usize, dir: &Path) -> Result<Flow> {
        let samples: Vec<SampleRecord> = dpo2d_data::io::read_jsonl(&dir.join("samples.jsonl"), "a sample record")?;
        let path = dir.join("scored.jsonl");
        let done = read_chunks::<ScoredRecord>(&path, SCORE_CHUNK, samples.len())?;
        if done == samples.len() {
            return Ok(Flow::Done(0));
        }
        self.say(&format!("round {n}: scoring the answers of {} prompts with {}", samples.len() - done, self.scorer.name()));
        let weights = self.cfg.train.aspect_weights;
        let bar = dpo2d_ui::progress::bar_if(
            self.run.progress,
            samples.len() as u64,
            "{bar:30} {pos}/{len} prompts scored [{elapsed_precise}<{eta_precise}]",
        );
        bar.set_position(done as u64);
        let mut chunks_now = 0;
        for chunk in samples.chunks(SCORE_CHUNK).skip(done / SCORE_CHUNK) {
            let items: Vec<Sampled> =
                chunk.iter().map(|s| Sampled { index: s.index, prompt: &self.prompts[s.index], responses: &s.responses }).collect();
            let scored = self.scorer.score(&dir.join("scorer"), &items)?;
            if scored.len() != chunk.len() || scored.iter().zip(chunk).any(|(r, s)| r.len() != s.responses.len()) {
                bail!("{} returned a different number of answers than it was given", self.scorer.name());
            }
            let records: Vec<ScoredRecord> = chunk
                .iter()
                .zip(scored)
                .map(|(s, responses)| ScoredRecord {
                    index: s.index,
                    id: s.id.clone(),
                    prompt: s.prompt.clone(),
                    scores: responses.iter().map(|r| rank::sample_score(r, &weights)).collect(),
                    responses,
                    right: self.prompts[s.index]
                        .problem
                        .as_ref()
                        .map(|p| s.responses.iter().map(|r| dpo2d_eval::arithmetic::check(p, r).correct).collect())
                        .unwrap_or_default(),
                })
                .collect();
            if self.keep_chunk(&path, &records, &bar, (n, Phase::Scoring), &mut chunks_now)? {
                return Ok(Flow::Stopped);
            }
        }
        bar.finish_and_clear();
        Ok(Flow::Done(samples.len() - done))
    }

    /// `pairs.jsonl`: each prompt's best answer against its worst.
    fn pair(&self, n: usize, policy: &str, dir: &Path) -> Result<RoundReport> {
        let scored: Vec<ScoredRecord> = dpo2d_data::io::read_jsonl(&dir.join("scored.jsonl"), "a scored record")?;
        let weights = self.cfg.train.aspect_weights;
        let pairs: Vec<Pair> =
            scored.iter().filter_map(|s| rank::pair_from_samples(s.id.clone(), s.prompt.clone(), &s.responses, &weights)).collect();
        let all: Vec<f64> = scored.iter().flat_map(|s| s.scores.iter().flatten().copied()).collect();
        let side = |f: fn(&Pair) -> &Response| -> Vec<f64> { pairs.iter().filter_map(|p| rank::sample_score(f(p), &weights)).collect() };
        let report = RoundReport {
            round: n,
            started_from: policy.to_string(),
            policy: PathBuf::new(),
            prompts: scored.len(),
            pairs: pairs.len(),
            ties: scored.len() - pairs.len(),
            mean_score: mean(&all),
            chosen_mean_score: mean(&side(|p| &p.chosen)),
            rejected_mean_score: mean(&side(|p| &p.rejected)),
            sampled_now: 0,
            scored_now: 0,
            trained_now: 0,
        };
        self.say(&format!(
            "round {n}: {} pairs from {} prompts ({} without a pair); mean answer score {:.3} (chosen {:.3}, rejected {:.3})",
            report.pairs, report.prompts, report.ties, report.mean_score, report.chosen_mean_score, report.rejected_mean_score
        ));
        if pairs.is_empty() {
            bail!(
                "round {n}: no prompt had answers of different scores, so there is nothing to train on; \
                 sample more answers (--samples-per-prompt), at a higher --temperature, or for more prompts"
            );
        }
        dpo2d_fs::write_file_with(&dir.join("pairs.jsonl"), |tmp| dpo2d_data::io::write_jsonl(tmp, &pairs).map(|_| ()))?;
        Ok(report)
    }

    /// Train from `policy` on the round's pairs, resuming from the latest
    /// checkpoint of an earlier attempt. The trained model, unless stopped.
    fn train(&self, n: usize, policy: &str, dir: &Path) -> Result<(Flow, Option<PathBuf>)> {
        let mut cfg = self.cfg.train.clone();
        cfg.model = policy.to_string();
        cfg.train_file = Some(dir.join("pairs.jsonl"));
        cfg.output_dir = dir.join("train");
        let resume = dpo2d_train::checkpoint::latest_checkpoint_with(&cfg.output_dir, &|s| self.say(&format!("warning: {s}")));
        self.say(&match &resume {
            Some(c) => format!("round {n}: training resumes from {}", c.display()),
            None => format!("round {n}: training {} from {policy}", cfg.loss_type),
        });
        let stop_after = self.run.stop_at.filter(|s| s.round == n && s.phase == Phase::Training).map(|s| s.after);
        let opts = RunOptions {
            // No checkpoint: whatever an earlier attempt left is started over.
            overwrite_output_dir: resume.is_none(),
            resume,
            progress: self.run.progress,
            stop_after,
            cache_dir: self.run.cache_dir.clone(),
            quiet: self.run.quiet,
            device: self.run.device,
            stop_signal: self.run.stop_signal.clone(),
        };
        let outcome = train(&cfg, &opts)?;
        let steps = outcome.global_step - outcome.start_step;
        if outcome.interrupted {
            return Ok((Flow::Stopped, None));
        }
        if !self.run.quiet {
            eprintln!("{}", outcome.summary);
        }
        Ok((Flow::Done(steps), Some(outcome.final_model_dir)))
    }

    fn load(&self, policy: &str) -> Result<LoadedModel> {
        let path = dpo2d_model::fetch::resolve_model(policy, self.run.cache_dir.as_deref())?;
        let opts = LoadOptions { device: self.run.device.device()?, ..LoadOptions::default() };
        dpo2d_model::load(&path, &opts).with_context(|| format!("loading the policy {policy}"))
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// The records of a JSONL file written by [`append`].
/// How many records of a chunk-by-chunk file are complete (whole chunks, or
/// all `total`); a torn or partial last chunk of a stopped run is cut off
/// the file so the chunk is done again.
fn read_chunks<T: DeserializeOwned + Serialize>(path: &Path, per_chunk: usize, total: usize) -> Result<usize> {
    if !path.exists() {
        return Ok(0);
    }
    let mut good: Vec<T> = vec![];
    let mut torn = false;
    for line in dpo2d_data::io::jsonl_lines(path)? {
        match line.ok().and_then(|l| serde_json::from_str(&l.text).ok()) {
            Some(r) => good.push(r),
            None => {
                torn = true;
                break;
            }
        }
    }
    let keep = if good.len() >= total { total } else { good.len() / per_chunk * per_chunk };
    if torn || keep != good.len() {
        good.truncate(keep);
        dpo2d_fs::write_file_with(path, |tmp| dpo2d_data::io::write_jsonl(tmp, &good).map(|_| ()))?;
    }
    Ok(keep)
}

/// Append records as JSONL lines and flush them to disk.
fn append<T: Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut buf = vec![];
    for r in records {
        serde_json::to_writer(&mut buf, r)?;
        buf.push(b'\n');
    }
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.write_all(&buf).and_then(|_| f.sync_data()).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_chunks_are_cut_off() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.jsonl");
        assert_eq!(read_chunks::<serde_json::Value>(&p, 2, 5).unwrap(), 0);
        append(&p, &[1, 2, 3].map(|i| serde_json::json!({ "i": i }))).unwrap();
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"{\"i\": 4").unwrap();
        assert_eq!(read_chunks::<serde_json::Value>(&p, 2, 5).unwrap(), 2);
        assert_eq!(dpo2d_data::io::read_jsonl::<serde_json::Value>(&p, "valid JSON").unwrap().len(), 2);
        append(&p, &[3, 4, 5].map(|i| serde_json::json!({ "i": i }))).unwrap();
        assert_eq!(read_chunks::<serde_json::Value>(&p, 2, 5).unwrap(), 5);
    }
}
