//! The training loop: data -> tokens -> packed forward passes of policy (and
//! reference) -> loss -> AdamW, with gradient accumulation, clipping, a
//! learning-rate schedule, evaluation, metrics, checkpoints and exact resume.
//!
//! [`train`] is the loop; [`Trainer`] holds the run and has one method per
//! part of it: `new` (data, models, tokens, reference), `step`, `log`,
//! `evaluate`, `save` and `finish`.
//!
//! Exact resume: everything random is derived from the seed and a counter
//! (epoch for the data order), weights and optimizer moments are saved
//! bit-exactly, and the metrics window in progress is saved with the
//! checkpoint, so a resumed run ends with the same weights and metrics as an
//! uninterrupted one. LoRA dropout masks come from the model's own RNG
//! stream, whose state is saved with the checkpoint too.
//!
//! Speed: see [`crate::packing`] (padding-free packing, one forward for the
//! prompt shared by both responses, label log-probs without a stored full
//! log-softmax) and [`crate::reference`] (reference log-probs precomputed once).

use crate::align::{AlignOptions, Aligner, TokenizedPair};
use crate::batch::{Models, Objective, Split};
use crate::checkpoint::{self, TrainerState};
use crate::config::{Task, TrainConfig};
use crate::metrics::{Accumulator, MetricsWriter, Record};
use crate::optim::{clip_scale, global_grad_norm, AdamW, AdamWParams};
use crate::phases::Phase;
use crate::reference::{Precompute, Reference};
use crate::reward::RewardHead;
use crate::sampler::Sampler;
use crate::schedule::{self, SchedulerType};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use dpo2d_data::{load_pairs, LoadOptions as DataLoadOptions, Pair, Requirement};
use dpo2d_kernels as kernels;
use dpo2d_model::llama::{CausalLM, LoadOptions};
use dpo2d_model::lora::LoraConfig;
use dpo2d_model::source::TextSide;
use dpo2d_model::DeviceSpec;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How to run (beyond the configuration).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Checkpoint directory to resume from.
    pub resume: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop after this many updates as if interrupted (after any checkpoint of
    /// that step is written); for tests of resume.
    pub stop_after: Option<usize>,
    /// The dpo2d cache (fetched models, precomputed reference log-probs);
    /// default: `$DPO2D_CACHE` or the user cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Print a line per logging step to stderr when there is no progress bar.
    pub quiet: bool,
    /// Where to compute.
    pub device: DeviceSpec,
    /// A fresh run may replace the outputs of an earlier run in `output_dir`
    /// (HF's `overwrite_output_dir`); without it, such a directory is refused.
    pub overwrite_output_dir: bool,
    /// Set (e.g. by a Ctrl-C handler) to stop after the current update with
    /// a checkpoint.
    pub stop_signal: Option<Arc<AtomicBool>>,
}

/// What a finished run produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub output_dir: PathBuf,
    pub history: Vec<Record>,
    pub global_step: usize,
    /// Directory holding the final model (HF directory; for LoRA the merged
    /// model, or with `save_merged` off the adapter directory).
    pub final_model_dir: PathBuf,
    pub summary: String,
    pub charts: Vec<PathBuf>,
    pub interrupted: bool,
    /// Step this run started from (0, or the resumed checkpoint's step).
    pub start_step: usize,
    /// The checkpoint written when the run was stopped by its stop signal.
    pub checkpoint: Option<PathBuf>,
}

/// Train according to `cfg`. See the module documentation.
pub fn train(cfg: &TrainConfig, run: &RunOptions) -> Result<TrainOutcome> {
    let mut trainer = Trainer::new(cfg, run)?;
    trainer.evaluate_before_training()?;
    while trainer.global_step < trainer.total {
        let update = trainer.step()?;
        trainer.log(&update)?;
        trainer.evaluate_if_due()?;
        let saved = trainer.save_if_due()?;
        dpo2d_fs::hang_point(&format!("step:{}", trainer.global_step));
        if trainer.signalled() && trainer.global_step < trainer.total {
            let checkpoint = match saved {
                Some(dir) => dir,
                None => trainer.save_checkpoint()?,
            };
            return Ok(trainer.interrupted(Some(checkpoint)));
        }
        if trainer.stop_requested() {
            return Ok(trainer.interrupted(None));
        }
    }
    trainer.finish()
}

/// What one optimizer update reports to the log.
pub struct Update {
    /// `None` when the update was skipped (not finite).
    pub grad_norm: Option<f64>,
    pub lr: f64,
}

/// The metrics being gathered between logging steps, and the log so far.
#[derive(Default)]
struct MetricsLog {
    history: Vec<Record>,
    /// Per-pair sums since the last logging step.
    window: Accumulator,
    window_tokens: usize,
    train_tokens: usize,
    last_eval_step: Option<usize>,
    /// Updates skipped for a non-finite loss or gradient.
    nonfinite_updates: usize,
}

/// A training run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    run: RunOptions,
    objective: Objective,
    model_path: PathBuf,
    text: TextSide,
    models: Models,
    train: Vec<TokenizedPair>,
    eval: Vec<TokenizedPair>,
    sampler: Sampler,
    scheduler: SchedulerType,
    warmup: usize,
    /// Optimizer updates of the whole run.
    total: usize,
    vars: Vec<(String, Var)>,
    optimizer: AdamW,
    config_hash: String,
    /// Hash of the token ids of the training and held-out pairs.
    data_fingerprint: String,
    /// Held while the run writes into `output_dir`.
    _lock: dpo2d_fs::DirLock,
    /// Optimizer updates done.
    global_step: usize,
    start_step: usize,
    metrics: MetricsLog,
    writer: MetricsWriter,
    progress: Option<dpo2d_ui::ProgressBar>,
    /// Training time as HF's `train_runtime`: reference precompute + loop + evals.
    clock: Instant,
    window_clock: Instant,
    phases: crate::phases::PhaseTimes,
}

impl Trainer {
    /// Everything before the first update: data, models, tokens, the
    /// reference, the optimizer, and the state of a resumed run.
    pub fn new(cfg: &TrainConfig, run: &RunOptions) -> Result<Trainer> {
        cfg.validate()?;
        let say = |s: &str| {
            if !run.quiet {
                eprintln!("{s}");
            }
        };
        let lock = open_output_dir(cfg, run, &say)?;
        let (train_pairs, eval_pairs) = load_data(cfg)?;
        let model_path = dpo2d_model::fetch::resolve_model(&cfg.model, run.cache_dir.as_deref())?;
        let text = dpo2d_model::source::load_text_side(&model_path)?;
        let opts = policy_options(cfg, run, &say)?;
        let resume = run.resume.as_ref().map(|dir| Ok::<_, anyhow::Error>((dir.clone(), checkpoint::load_state(dir)?))).transpose()?;
        let mut policy = load_policy(&model_path, &opts, resume.as_ref().map(|(d, _)| d.as_path()))?;
        policy.set_gradient_checkpointing(cfg.gradient_checkpointing);

        let (train, eval) = tokenize(cfg, &text, &train_pairs, &eval_pairs, &say)?;

        let data_fingerprint = data_fingerprint(&train, &eval);
        let clock = Instant::now();
        let frozen = LoadOptions { trainable: false, lora: None, ..opts.clone() };
        let mut phases = crate::phases::PhaseTimes::from_env(policy.device());
        phases.start();
        let reference = prepare_reference(cfg, run, &model_path, &frozen, &policy, resume.is_some(), &train, &eval, &say)?;
        phases.mark(Phase::Reference);

        let objective = objective(cfg, &policy, &train, resume.as_ref().map(|(d, _)| d.as_path()))?;
        let mut vars = policy.trainable_vars();
        vars.extend(objective.vars());
        if vars.is_empty() {
            bail!("the model has no trainable parameters");
        }
        let params = AdamWParams { weight_decay: cfg.weight_decay, beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, eps: cfg.adam_epsilon };
        let optimizer = AdamW::new(vars.clone(), params)?;
        let micro_step = resume.as_ref().map(|(_, state)| state.micro_step).unwrap_or(0);
        let sampler = Sampler::new(cfg.train_sampling_strategy, cfg.seed, train.len(), cfg.per_device_train_batch_size, micro_step);
        let total = total_updates(cfg, &sampler);
        let mut t = Trainer {
            cfg: cfg.clone(),
            run: run.clone(),
            objective,
            model_path,
            text,
            models: Models { policy, reference },
            train,
            eval,
            sampler,
            scheduler: cfg.lr_scheduler_type,
            warmup: schedule::warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total),
            total,
            vars,
            optimizer,
            config_hash: config_hash(cfg),
            data_fingerprint,
            _lock: lock,
            global_step: 0,
            start_step: 0,
            metrics: MetricsLog::default(),
            writer: MetricsWriter::new(&cfg.output_dir),
            progress: None,
            clock,
            window_clock: Instant::now(),
            phases,
        };
        match &resume {
            Some((dir, state)) => {
                t.restore(dir, state)?;
                say(&format!("resuming from {} at step {}", dir.display(), t.start_step));
            }
            None => t.writer.rewrite(&[])?,
        }
        dpo2d_fs::write_file(&cfg.output_dir.join("config.toml"), cfg.to_toml()?)?;
        say(&t.describe());
        if run.progress {
            t.progress = Some(t.progress_bar());
        }
        Ok(t)
    }

    fn progress_bar(&self) -> dpo2d_ui::ProgressBar {
        let pb = dpo2d_ui::progress::bar(self.total as u64, "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}");
        pb.set_position(self.start_step as u64);
        pb
    }

    /// Continue where the checkpoint `dir` (with `state`) stopped.
    fn restore(&mut self, dir: &Path, state: &TrainerState) -> Result<()> {
        self.check_identity(dir, state)?;
        self.metrics.nonfinite_updates = state.nonfinite_updates;
        self.optimizer.load(&dir.join("optimizer.safetensors"))?;
        self.start_step = state.global_step;
        self.global_step = state.global_step;
        self.metrics.history = state.log_history.clone();
        self.metrics.window = state.window.clone();
        self.metrics.window_tokens = state.window_tokens;
        if let Some(rng) = state.dropout_rng {
            self.models.policy.set_dropout_rng_state(rng);
        }
        self.writer.rewrite(&self.metrics.history)
    }

    /// A checkpoint continues only the run that wrote it: same settings
    /// (those that change the weights), same data, a step before the end.
    fn check_identity(&self, dir: &Path, state: &TrainerState) -> Result<()> {
        let d = dir.display();
        let changed = match &state.config {
            Some(saved) => self.cfg.changes_from(saved)?,
            None if state.config_hash != self.config_hash => vec!["(settings of an older checkpoint format)".into()],
            None => vec![],
        };
        if !changed.is_empty() {
            bail!(
                "--resume {d}: the checkpoint belongs to a run with other settings:\n  {}\nresume with the same settings, \
                 or start a new run (another --output-dir, or --overwrite-output-dir)",
                changed.join("\n  ")
            );
        }
        if state.data_fingerprint.as_ref().is_some_and(|f| *f != self.data_fingerprint) {
            let files: Vec<String> =
                [&self.cfg.train_file, &self.cfg.eval_file].into_iter().flatten().map(|f| f.display().to_string()).collect();
            bail!(
                "--resume {d}: the training data ({}) changed since the checkpoint was written; resume with the same data, \
                 or start a new run",
                files.join(", ")
            );
        }
        if state.global_step >= self.total {
            bail!("--resume {d}: the checkpoint is at step {}, but this run has {} updates", state.global_step, self.total);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let params: usize = self.vars.iter().map(|(_, v)| v.elem_count()).sum();
        format!(
            "training {} pairs ({} held out), {}, {} updates of {} x {} pairs, {params} trainable parameters",
            self.train.len(),
            self.eval.len(),
            self.objective.describe(),
            self.total,
            self.cfg.per_device_train_batch_size,
            self.cfg.gradient_accumulation_steps,
        )
    }

    /// Held-out metrics before the first update: the baseline the run is judged against.
    fn evaluate_before_training(&mut self) -> Result<()> {
        if !self.eval.is_empty() && self.global_step == 0 {
            let rec = self.evaluate()?;
            self.record(rec)?;
            self.window_clock = Instant::now();
        }
        Ok(())
    }

    /// One optimizer update over `gradient_accumulation_steps` micro-batches.
    /// A non-finite loss or gradient stops the run with an error naming the
    /// step, or with `skip_nonfinite_updates` leaves the weights and the
    /// metrics window as they were and counts the update as skipped.
    pub fn step(&mut self) -> Result<Update> {
        self.models.policy.set_training(true);
        let window_before = (self.metrics.window.clone(), self.metrics.window_tokens, self.metrics.train_tokens);
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut finite = true;
        for _ in 0..self.cfg.gradient_accumulation_steps {
            let idx = self.sampler.next_batch();
            finite &= self.accumulate(&idx, &mut grads)?;
        }
        self.phases.start();
        let grad_norm = global_grad_norm(&grads)?;
        self.phases.mark(Phase::GradNorm);
        let lr = schedule::lr_at(self.scheduler, self.cfg.learning_rate, self.global_step, self.warmup, self.total);
        self.global_step += 1;
        if !(finite && grad_norm.is_finite()) {
            if !self.cfg.skip_nonfinite_updates {
                bail!(
                    "step {}: the loss or the gradient is not finite (NaN or infinite; gradient norm {grad_norm}); \
                     lower the learning rate or check the model and data, or skip such updates with --skip-nonfinite-updates",
                    self.global_step
                );
            }
            (self.metrics.window, self.metrics.window_tokens, self.metrics.train_tokens) = window_before;
            self.metrics.nonfinite_updates += 1;
            self.say(&format!("warning: step {}: non-finite loss or gradient, update skipped", self.global_step));
            return Ok(Update { grad_norm: None, lr });
        }
        self.optimizer.step(&grads, lr, clip_scale(grad_norm, self.cfg.max_grad_norm))?;
        self.phases.mark(Phase::Optimizer);
        self.metrics.window.add("grad_norm", grad_norm);
        self.metrics.window.add("lr", lr);
        Ok(Update { grad_norm: Some(grad_norm), lr })
    }

    /// Add the gradient of one micro-batch (scaled to its share of the
    /// update) to `grads`, and its metrics to the window. False when a
    /// metric (the loss among them) is not finite.
    fn accumulate(&mut self, idx: &[usize], grads: &mut [Option<Tensor>]) -> Result<bool> {
        // A mean of per-pair losses can run as several smaller
        // forward/backward passes with the same gradient and a fraction
        // of the activation memory.
        let chunk =
            if !self.objective.splits_over_pairs() || self.cfg.pairs_per_forward == 0 { idx.len() } else { self.cfg.pairs_per_forward };
        let gas = self.cfg.gradient_accumulation_steps as f64;
        let mut finite = true;
        for part in idx.chunks(chunk.max(1)) {
            self.phases.start();
            let out = self.models.loss(&self.objective, &self.train, part, Split::Train)?;
            self.phases.mark(Phase::Forward);
            finite &= out.metrics.iter().all(|(_, v)| v.is_finite());
            // Window means are per-pair means.
            for (k, v) in &out.metrics {
                self.metrics.window.add_weighted(k, v * part.len() as f64, part.len());
            }
            self.metrics.window_tokens += out.tokens;
            self.metrics.train_tokens += out.tokens;
            let share = part.len() as f64 / idx.len() as f64;
            let part_grads = self.models.gradients(&self.objective, &(out.loss * (share / gas))?.backward()?)?;
            self.phases.mark(Phase::Backward);
            for (acc, g) in grads.iter_mut().zip(part_grads) {
                if let Some(g) = g {
                    kernels::accumulate(acc, g)?;
                }
            }
            self.phases.mark(Phase::Accumulate);
        }
        Ok(finite)
    }

    fn say(&self, s: &str) {
        if !self.run.quiet {
            eprintln!("{s}");
        }
    }

    /// Write a record of the window's means on logging steps (and the last).
    pub fn log(&mut self, update: &Update) -> Result<()> {
        let step = self.global_step;
        if !step.is_multiple_of(self.cfg.logging_steps.max(1)) && step != self.total {
            return Ok(());
        }
        let secs = self.window_clock.elapsed().as_secs_f64().max(1e-9);
        let mut values = self.metrics.window.take_means("");
        // grad_norm and lr: the values of the step logged (as TRL).
        if let Some(g) = update.grad_norm {
            values.insert("grad_norm".into(), g);
        }
        values.insert("lr".into(), update.lr);
        if self.cfg.skip_nonfinite_updates {
            values.insert("nonfinite_updates".into(), self.metrics.nonfinite_updates as f64);
        }
        values.insert("tokens/s".into(), self.metrics.window_tokens as f64 / secs);
        self.metrics.window_tokens = 0;
        self.window_clock = Instant::now();
        let rec = Record { step, epoch: self.sampler.epoch(), values };
        if let Some(pb) = &self.progress {
            let get = |k: &str| rec.get(k).unwrap_or(f64::NAN);
            pb.set_message(match self.objective {
                Objective::Preference(_) => {
                    format!("loss {:.4} acc {:.2} margin {:.4}", get("loss"), get("rewards/accuracies"), get("rewards/margins"))
                }
                Objective::Reward(_) => format!("mse {:.4} acc {:.2} within-one {:.2}", get("loss"), get("accuracy"), get("within_one")),
            });
        } else if !self.run.quiet {
            eprintln!("{}", serde_json::to_string(&rec)?);
        }
        self.record(rec)
    }

    fn record(&mut self, rec: Record) -> Result<()> {
        self.writer.append(&rec)?;
        self.metrics.history.push(rec);
        Ok(())
    }

    fn evaluate_if_due(&mut self) -> Result<()> {
        let step = self.global_step;
        if !self.eval.is_empty() && self.cfg.eval_steps > 0 && step.is_multiple_of(self.cfg.eval_steps) {
            let rec = self.evaluate()?;
            self.record(rec)?;
            self.metrics.last_eval_step = Some(step);
        }
        if let Some(pb) = &self.progress {
            pb.set_position(step as u64);
        }
        Ok(())
    }

    /// Metrics over the eval set (no gradients, dropout off), prefixed `eval_`.
    pub fn evaluate(&self) -> Result<Record> {
        self.models.policy.set_training(false);
        let bs = forward_chunk(&self.cfg, self.cfg.per_device_eval_batch_size);
        let mut acc = Accumulator::default();
        let idx: Vec<usize> = (0..self.eval.len()).collect();
        for chunk in idx.chunks(bs) {
            let out = self.models.loss(&self.objective, &self.eval, chunk, Split::Eval)?;
            // Weight batch means by batch size so the result is a per-pair mean.
            for (k, v) in &out.metrics {
                acc.add_weighted(k, v * chunk.len() as f64, chunk.len());
            }
        }
        self.models.policy.set_training(true);
        Ok(Record { step: self.global_step, epoch: self.sampler.epoch(), values: acc.take_means("eval_") })
    }

    /// A checkpoint every `save_steps` updates (not at the end: `final/` is).
    fn save_if_due(&mut self) -> Result<Option<PathBuf>> {
        let step = self.global_step;
        if self.cfg.save_steps > 0 && step.is_multiple_of(self.cfg.save_steps) && step < self.total {
            return self.save_checkpoint().map(Some);
        }
        Ok(None)
    }

    /// Write the resumable `checkpoint-<step>` and drop the oldest beyond
    /// `save_total_limit`.
    fn save_checkpoint(&self) -> Result<PathBuf> {
        let dir = self.cfg.output_dir.join(format!("checkpoint-{}", self.global_step));
        self.save(&dir, true)?;
        checkpoint::rotate(&self.cfg.output_dir, self.cfg.save_total_limit)?;
        Ok(dir)
    }

    /// Write a checkpoint: resumable (with optimizer state) or final (with
    /// LoRA weights merged, unless `save_merged` is off for a policy).
    pub fn save(&self, dir: &Path, resumable: bool) -> Result<()> {
        let base_model = self.model_path.display().to_string();
        let contents = checkpoint::Contents {
            policy: &self.models.policy,
            text: &self.text,
            base_model: &base_model,
            optimizer: resumable.then_some(&self.optimizer),
            merged: !resumable && self.writes_merged(),
            head: match &self.objective {
                Objective::Reward(h) => Some(h),
                Objective::Preference(_) => None,
            },
        };
        let state = if resumable {
            self.state()
        } else {
            TrainerState { data_order: vec![], window: Accumulator::default(), window_tokens: 0, ..self.state() }
        };
        checkpoint::save(dir, &contents, &state)
    }

    /// Everything besides weights and optimizer that a resumed run needs.
    fn state(&self) -> TrainerState {
        TrainerState {
            global_step: self.global_step,
            micro_step: self.sampler.micro_step(),
            max_steps: self.total,
            epoch: self.sampler.epoch(),
            seed: self.cfg.seed,
            data_order: self.sampler.current_order(),
            log_history: self.metrics.history.clone(),
            window: self.metrics.window.clone(),
            window_tokens: self.metrics.window_tokens,
            config_hash: self.config_hash.clone(),
            config: Some(self.cfg.clone()),
            data_fingerprint: Some(self.data_fingerprint.clone()),
            nonfinite_updates: self.metrics.nonfinite_updates,
            dropout_rng: Some(self.models.policy.dropout_rng_state()),
        }
    }

    fn stop_requested(&self) -> bool {
        self.run.stop_after == Some(self.global_step) && self.global_step < self.total
    }

    /// The stop signal (Ctrl-C) has been given.
    fn signalled(&self) -> bool {
        self.run.stop_signal.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// The outcome of a run stopped before its last step (checkpoints so far stay).
    fn interrupted(self, checkpoint: Option<PathBuf>) -> TrainOutcome {
        if let Some(pb) = &self.progress {
            pb.finish();
        }
        TrainOutcome {
            output_dir: self.cfg.output_dir.clone(),
            history: self.metrics.history,
            global_step: self.global_step,
            final_model_dir: self.cfg.output_dir,
            summary: String::new(),
            charts: vec![],
            interrupted: true,
            start_step: self.start_step,
            checkpoint,
        }
    }

    /// Whether the final save of a LoRA run writes the merged model too
    /// (always for a reward model, whose scorer reads it).
    fn writes_merged(&self) -> bool {
        self.cfg.save_merged || matches!(self.objective, Objective::Reward(_))
    }

    /// After the last step: final evaluation, `train_results.json`, the final
    /// model in `final/` (LoRA: the adapter, plus the merged model in
    /// `final/merged/` unless `save_merged` is off), charts and the summary.
    pub fn finish(mut self) -> Result<TrainOutcome> {
        if let Some(pb) = &self.progress {
            pb.finish();
        }
        if !self.eval.is_empty() && self.metrics.last_eval_step != Some(self.total) {
            let rec = self.evaluate()?;
            self.record(rec)?;
        }
        self.write_results()?;
        let out_dir = self.cfg.output_dir.clone();
        let final_dir = out_dir.join("final");
        self.save(&final_dir, false)?;
        let final_model_dir =
            if self.models.policy.lora_config().is_some() && self.writes_merged() { final_dir.join("merged") } else { final_dir };
        let history = self.metrics.history;
        let charts = crate::charts::draw_charts(&history, &out_dir)?;
        let summary = crate::metrics::summary(&history);
        dpo2d_fs::write_file(&out_dir.join("summary.txt"), &summary)?;
        Ok(TrainOutcome {
            output_dir: out_dir,
            history,
            global_step: self.global_step,
            final_model_dir,
            summary,
            charts,
            interrupted: false,
            start_step: self.start_step,
            checkpoint: None,
        })
    }

    /// `train_results.json`, as HF's Trainer writes it.
    fn write_results(&self) -> Result<()> {
        let train_runtime = self.clock.elapsed().as_secs_f64();
        if let Some(table) = self.phases.report() {
            self.say(&table);
        }
        let losses: Vec<f64> = self.metrics.history.iter().filter_map(|r| r.get("loss")).collect();
        let tokens = self.metrics.train_tokens;
        let results = serde_json::json!({
            "train_runtime": train_runtime,
            "global_step": self.total,
            "train_loss": losses.iter().sum::<f64>() / losses.len().max(1) as f64,
            "train_tokens": tokens,
            "train_tokens_per_second": tokens as f64 / train_runtime.max(1e-9),
            "resumed_from_step": self.start_step,
            "note": "train_runtime covers reference log-prob precompute, training and evaluation of this process (not model loading or saving)",
        });
        dpo2d_fs::write_file(&self.cfg.output_dir.join("train_results.json"), serde_json::to_string_pretty(&results)?)
    }
}

/// What the run minimises; a reward model's head is new or the checkpoint's.
fn objective(cfg: &TrainConfig, policy: &CausalLM, train: &[TokenizedPair], resume: Option<&Path>) -> Result<Objective> {
    Ok(match cfg.task {
        Task::Preference => Objective::Preference(cfg.loss_config()),
        Task::RewardModel => {
            // f32 for f32 and bf16 backbones (f64 for f64 test models).
            let dtype = if policy.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            let hidden = policy.config().hidden_size;
            Objective::Reward(match resume {
                Some(dir) => RewardHead::load(dir, hidden, dtype, policy.device())?,
                None => RewardHead::new(hidden, crate::reward::mean_labels(train), cfg.seed, dtype, policy.device())?,
            })
        }
    })
}

/// Pairs per evaluation forward pass (the policy itself, whose graph is kept;
/// the reference pass over the held-out pairs uses the same):
/// `pairs_per_forward` caps the batch, except for KTO.
fn forward_chunk(cfg: &TrainConfig, batch: usize) -> usize {
    if cfg.loss_type.needs_kto_kl() || cfg.pairs_per_forward == 0 {
        batch.max(1)
    } else {
        batch.min(cfg.pairs_per_forward).max(1)
    }
}

/// Optimizer updates of the whole run: `max_steps`, or `num_train_epochs`
/// worth of micro-batches divided by `gradient_accumulation_steps`.
fn total_updates(cfg: &TrainConfig, sampler: &Sampler) -> usize {
    if cfg.max_steps > 0 {
        return cfg.max_steps;
    }
    let micro_batches = cfg.num_train_epochs * sampler.micro_batches_per_epoch() as f64;
    (micro_batches / cfg.gradient_accumulation_steps as f64).ceil().max(1.0) as usize
}

/// Token ids and segment alignment of the training and held-out pairs.
fn tokenize(
    cfg: &TrainConfig,
    text: &TextSide,
    train: &[Pair],
    eval: &[Pair],
    say: &dyn Fn(&str),
) -> Result<(Vec<TokenizedPair>, Vec<TokenizedPair>)> {
    let aligner = Aligner::new(&text.tokenizer.inner, &text.chat)?;
    let opts = AlignOptions { max_length: cfg.max_length, max_prompt_length: cfg.max_prompt_length };
    let (train, report) = aligner.pairs(train, opts)?;
    say(&format!("train: {report}"));
    let (eval, report) = aligner.pairs(eval, opts)?;
    if !eval.is_empty() {
        say(&format!("eval: {report}"));
    }
    Ok((train, eval))
}

/// Training and held-out pairs: the eval file, or `eval_split` of the
/// training file. A 2-D loss reads the files as 2-D data, so a pair without
/// scored segments is a bad line like any other (`file:line: reason`,
/// skipped with `skip_invalid`).
fn load_data(cfg: &TrainConfig) -> Result<(Vec<Pair>, Vec<Pair>)> {
    let train_file = cfg.train_file.as_ref().context("no training data: set train_file (--train-file)")?;
    let train = load_file(train_file, cfg)?;
    let (train, eval) = match &cfg.eval_file {
        Some(f) => (train, load_file(f, cfg)?),
        None if cfg.eval_split > 0.0 => crate::sampler::split_held_out(train, cfg.eval_split, cfg.seed)?,
        None => (train, vec![]),
    };
    let scored = train.iter().chain(&eval).all(|p| p.chosen.is_scored() && p.rejected.is_scored());
    if cfg.task == Task::Preference {
        cfg.loss_type.check_data(scored).with_context(|| format!("{}", train_file.display()))?;
    }
    Ok((train, eval))
}

fn load_file(path: &Path, cfg: &TrainConfig) -> Result<Vec<Pair>> {
    let lt = cfg.loss_type;
    let requirement = if cfg.needs_segment_scores() { Requirement::Scored } else { Requirement::Plain };
    let loaded = load_pairs(path, &DataLoadOptions::new(requirement).skip_invalid(cfg.skip_invalid));
    let loaded = if cfg.task == Task::RewardModel {
        loaded.context(
            "a reward model learns from every response split into segments with 5-aspect scores (`dpo2d segment`, `dpo2d annotate`)",
        )?
    } else if lt.needs_segment_scores() {
        loaded.with_context(|| {
            format!(
                "loss_type {lt} needs every response split into segments with 5-aspect scores (`dpo2d segment`, \
                 `dpo2d annotate`), or train with a response-level loss such as --loss dpo"
            )
        })?
    } else {
        loaded?
    };
    if !loaded.skipped.is_empty() {
        eprintln!("warning: skipped {} invalid line(s):\n{}", loaded.skipped.lines_skipped, loaded.skipped);
    }
    if loaded.pairs.is_empty() {
        bail!("{}: no preference pairs", path.display());
    }
    Ok(loaded.pairs)
}

/// The policy: the starting model, or a resumed full fine-tuning
/// checkpoint; a LoRA checkpoint's adapters go onto the starting model.
/// How the policy is loaded: on the run's device, in [`weights_dtype`],
/// trainable in full or through LoRA adapters.
fn policy_options(cfg: &TrainConfig, run: &RunOptions, say: &dyn Fn(&str)) -> Result<LoadOptions> {
    let device = run.device.device()?;
    let lora = lora_config(cfg)?;
    Ok(LoadOptions { dtype: weights_dtype(cfg, &device, say), device, trainable: lora.is_none(), lora })
}

/// bf16 on a GPU: bf16 weights and activations, f32 master weights and
/// moments in the optimizer, f32 log-probs and loss. On the CPU bf16 is
/// slower than f32 (no bf16 matrix kernels), so f32 is kept there.
fn weights_dtype(cfg: &TrainConfig, device: &candle_core::Device, say: &dyn Fn(&str)) -> DType {
    if cfg.bf16 && device.is_cuda() {
        return DType::BF16;
    }
    if cfg.bf16 {
        say("note: bf16 is not used on CPU (slower than f32 there); training in f32");
    }
    DType::F32
}

fn load_policy(model_path: &Path, opts: &LoadOptions, resume: Option<&Path>) -> Result<CausalLM> {
    match (resume, &opts.lora) {
        (Some(dir), None) => {
            Ok(dpo2d_model::source::load(dir, opts).with_context(|| format!("loading the policy from checkpoint {}", dir.display()))?.model)
        }
        (Some(dir), Some(_)) => {
            let policy = dpo2d_model::source::load(model_path, opts)?.model;
            checkpoint::load_adapter(dir, &policy)?;
            Ok(policy)
        }
        (None, _) => Ok(dpo2d_model::source::load(model_path, opts)?.model),
    }
}

/// The reference the loss needs: none, run alongside the policy, or
/// precomputed (cached on disk).
#[allow(clippy::too_many_arguments)]
fn prepare_reference(
    cfg: &TrainConfig,
    run: &RunOptions,
    model_path: &Path,
    frozen: &LoadOptions,
    policy: &CausalLM,
    resuming: bool,
    train: &[TokenizedPair],
    eval: &[TokenizedPair],
    say: &dyn Fn(&str),
) -> Result<Reference> {
    let lt = cfg.loss_type;
    if !cfg.needs_reference() {
        return Ok(Reference::None);
    }
    let ref_path = match &cfg.ref_model {
        Some(r) => dpo2d_model::fetch::resolve_model(r, run.cache_dir.as_deref())?,
        None => model_path.to_path_buf(),
    };
    let load = || -> Result<CausalLM> { Ok(dpo2d_model::source::load(&ref_path, frozen)?.model) };
    if lt.needs_token_kl() || lt.needs_kto_kl() || !cfg.precompute_ref_log_probs {
        return Ok(Reference::Live(Box::new(load()?)));
    }
    let p = Precompute {
        model_path: &ref_path,
        cache_root: dpo2d_model::fetch::cache_dir(run.cache_dir.as_deref())?,
        // Gradient-free passes over frozen weights keep no activations: the
        // whole eval batch fits where a training pass would not.
        batch: cfg.per_device_eval_batch_size.max(1),
        eval_batch: forward_chunk(cfg, cfg.per_device_eval_batch_size),
        progress: run.progress,
    };
    let model = || -> Result<CausalLM> {
        match (&cfg.ref_model, policy.lora_config()) {
            // A LoRA policy's base model is its reference at any step: its
            // weights with the adapters left out (shared, not merged or loaded again).
            (None, Some(_)) => Ok(policy.base_view()?),
            // Before its first update the policy IS the reference (one model
            // in memory, not two); a frozen view shares its weights without
            // recording a graph.
            (None, None) if !resuming => Ok(policy.frozen_view()?),
            _ => load(),
        }
    };
    Reference::precomputed(&p, train, eval, model, say)
}

/// Lock `output_dir` for this run and, unless resuming, make sure it holds
/// no earlier run's outputs.
fn open_output_dir(cfg: &TrainConfig, run: &RunOptions, say: &dyn Fn(&str)) -> Result<dpo2d_fs::DirLock> {
    let lock = dpo2d_fs::DirLock::acquire(&cfg.output_dir).with_context(|| format!("output_dir {}", cfg.output_dir.display()))?;
    if run.resume.is_none() {
        claim_output_dir(&cfg.output_dir, run.overwrite_output_dir, say)?;
    }
    Ok(lock)
}

/// A fresh run must not mix its files with an earlier run's: refuse a
/// directory that holds one, or with `overwrite` remove the earlier outputs.
fn claim_output_dir(dir: &Path, overwrite: bool, say: &dyn Fn(&str)) -> Result<()> {
    let mut old: Vec<PathBuf> = checkpoint::checkpoints(dir).into_iter().map(|(_, p)| p).collect();
    old.extend(["final", "metrics.jsonl", "train_results.json"].iter().map(|f| dir.join(f)).filter(|p| p.exists()));
    if old.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = old.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
    if !overwrite {
        bail!(
            "output_dir {} already holds a training run ({}); continue it with --resume, choose another --output-dir, \
             or replace it with --overwrite-output-dir",
            dir.display(),
            names.join(", ")
        );
    }
    for p in &old {
        let res = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
        res.with_context(|| format!("--overwrite-output-dir: cannot remove {}", p.display()))?;
    }
    say(&format!("--overwrite-output-dir: removed the earlier run's {} from {}", names.join(", "), dir.display()));
    Ok(())
}

/// Hash of the token ids of the training and held-out pairs: what a
/// resumed run must train on to continue the same run.
fn data_fingerprint(train: &[TokenizedPair], eval: &[TokenizedPair]) -> String {
    let mut h = Sha256::new();
    crate::reference::hash_token_ids(&[train, eval], &mut h);
    hex::encode(h.finalize())[..16].to_string()
}

/// The fingerprint of the settings that change the numbers (output paths,
/// step counts and checkpoint cadence do not).
fn config_hash(cfg: &TrainConfig) -> String {
    let mut c = cfg.clone();
    c.output_dir = PathBuf::new();
    c.save_steps = 0;
    c.save_total_limit = 0;
    c.max_steps = 0;
    c.num_train_epochs = 0.0;
    let text = toml::to_string(&c).unwrap_or_default();
    hex::encode(Sha256::digest(text.as_bytes()))[..16].to_string()
}

fn lora_config(cfg: &TrainConfig) -> Result<Option<LoraConfig>> {
    if !cfg.use_lora {
        return Ok(None);
    }
    let lc = LoraConfig {
        r: cfg.lora_r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        targets: cfg.lora_target_modules.clone(),
        seed: cfg.seed,
    };
    lc.validate()?;
    Ok(Some(lc))
}
